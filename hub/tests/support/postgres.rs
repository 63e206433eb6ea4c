#![allow(dead_code)] // shared by several test crates, each using part of it
//! A real, throwaway PostgreSQL server for tests: Debian's `postgresql` package binaries
//! (`initdb`, `pg_ctl`) run as the `postgres` user on a fresh cluster in a temp dir, listening
//! on 127.0.0.1 at a free port and on a unix socket inside the temp dir. Stopped and deleted
//! on drop. Never touches the packaged `main` cluster.
//!
//! [`TestPostgres::start`] returns `None` (after saying why) when the server cannot run here
//! (not root, package missing); when the `CI` environment variable is set it panics instead,
//! so the CI machine never skips these tests silently.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

fn unavailable(why: &str) -> Option<TestPostgres> {
    if std::env::var_os("CI").is_some() {
        panic!("PostgreSQL is required on CI but cannot start: {why}");
    }
    eprintln!("skipping: PostgreSQL unavailable: {why} (install Debian's postgresql package and run as root)");
    None
}

/// The newest installed `/usr/lib/postgresql/<major>/bin`.
fn find_bin() -> Option<PathBuf> {
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    majors.sort();
    majors.pop().map(|(_, bin)| bin)
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run_as_postgres(bin: &Path, tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// A server certificate and key (PEM) for a server that accepts only TLS over TCP.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPostgres {
    pub fn start() -> Option<TestPostgres> {
        Self::start_with(None)
    }

    /// A server whose TCP connections must use TLS with this certificate (`hostssl` only in
    /// `pg_hba.conf`; the unix socket stays open for `createdb`).
    pub fn start_tls(tls: ServerTls) -> Option<TestPostgres> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<ServerTls>) -> Option<TestPostgres> {
        // Asking `id` keeps this file free of unsafe (no geteuid call).
        let uid =
            Command::new("id").arg("-u").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if uid.as_deref() != Some("0") {
            return unavailable("the tests start PostgreSQL as user postgres, which needs root");
        }
        let Some(bin) = find_bin() else {
            return unavailable("no /usr/lib/postgresql/<major>/bin with initdb and pg_ctl");
        };
        let ids = Command::new("id").args(["-u", "postgres"]).output().ok().filter(|o| o.status.success());
        let Some(ids) = ids else { return unavailable("there is no postgres user") };
        let pg_uid: u32 = String::from_utf8_lossy(&ids.stdout).trim().parse().unwrap();
        let dir = tempfile::Builder::new().prefix("flotilla-pg-").tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(pg_uid), None).unwrap();
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).unwrap();
        std::os::unix::fs::chown(&sock, Some(pg_uid), None).unwrap();
        let data_s = data.to_str().unwrap();
        if let Err(e) = run_as_postgres(
            &bin,
            "initdb",
            &["-D", data_s, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
        ) {
            return unavailable(&e);
        }
        let mut ssl_opts = String::new();
        if let Some(tls) = &tls {
            // PostgreSQL refuses a key file others can read; it must belong to its user.
            for (file, pem) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
                let path = data.join(file);
                std::fs::write(&path, pem).unwrap();
                std::os::unix::fs::chown(&path, Some(pg_uid), None).unwrap();
                std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            }
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
            )
            .unwrap();
            ssl_opts = " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key".into();
        }
        // A few tries: the free port may be taken between the probe and the bind.
        for _ in 0..3 {
            let port = free_tcp_port();
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections=100 -c fsync=on{ssl_opts}",
                sock.display()
            );
            let log = dir.path().join("postgres.log");
            let log_s = log.to_str().unwrap().to_string();
            match run_as_postgres(&bin, "pg_ctl", &["-D", data_s, "-l", &log_s, "-o", &opts, "-w", "-t", "30", "start"])
            {
                Ok(()) => {
                    let pg = TestPostgres { dir, bin, port };
                    pg.wait_ready();
                    return Some(pg);
                }
                Err(e) => {
                    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                    if !log_text.contains("in use") {
                        return unavailable(&format!("{e}\n{log_text}"));
                    }
                }
            }
        }
        unavailable("no free port after three tries")
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("PostgreSQL on port {} did not accept connections within 30 s", self.port);
    }

    /// The URL of the server's `postgres` database.
    /// The cluster's directory: its data files and WAL.
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        let sock = self.dir.path().join("sock");
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("createdb"))
            .args(["-h", sock.to_str().unwrap(), "-p", &self.port.to_string(), name])
            .output()
            .unwrap();
        assert!(out.status.success(), "createdb {name} failed: {}", String::from_utf8_lossy(&out.stderr));
        self.url_for(name)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        // Immediate: the cluster is thrown away, nothing needs a clean checkpoint.
        let _ = run_as_postgres(&self.bin, "pg_ctl", &["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
        if std::thread::panicking() {
            eprintln!("----- postgres log -----\n{}", self.log_text());
        }
    }
}
