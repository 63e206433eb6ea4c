//! Pull-and-unpack benchmark: pulls an image from a registry into a fresh store, unpacks every
//! layer into snapshots, and reports the time of each phase, to compare with
//! `skopeo copy docker://REF oci:DIR` followed by `umoci unpack`.
//!
//! ```text
//! cargo bench -p flotilla-oci-runtime --bench pull -- 127.0.0.1:5000/debian:bookworm \
//!     [--platform linux/amd64] [--insecure host:port] [--runs 3] [--keep DIR]
//! ```
//!
//! Loopback registries are spoken to over plain HTTP. Unpacking needs root (whiteouts). Only
//! measures when run by `cargo bench` (which passes `--bench`); under `cargo test` it exits.

use std::path::PathBuf;
use std::time::Instant;

use flotilla_oci_runtime::{BlobStore, ImageStore, Platform, Registry, RegistryConfig};

struct Args {
    reference: String,
    platform: Platform,
    insecure: Vec<String>,
    runs: usize,
    keep: Option<PathBuf>,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = std::env::args().skip(1);
    let mut bench = false;
    let mut reference = None;
    let mut platform = Platform::host();
    let mut insecure = Vec::new();
    let mut runs = 3;
    let mut keep = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => bench = true,
            "--platform" => {
                let v = args.next().ok_or("--platform needs os/arch[/variant]")?;
                platform = Platform::parse(&v).ok_or(format!("bad platform {v:?}"))?;
            }
            "--insecure" => insecure.push(args.next().ok_or("--insecure needs host:port")?),
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).ok_or("--runs needs a number")?,
            "--keep" => keep = Some(PathBuf::from(args.next().ok_or("--keep needs a directory")?)),
            other if other.starts_with("--") => {}
            other => reference = Some(other.to_owned()),
        }
    }
    if !bench {
        return Ok(None);
    }
    let reference =
        reference.ok_or("usage: pull -- REFERENCE [--platform os/arch] [--insecure host:port] [--runs N]")?;
    Ok(Some(Args { reference, platform, insecure, runs, keep }))
}

fn main() {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            eprintln!("pull bench: not measuring (run with cargo bench)");
            return;
        }
        Err(e) => {
            eprintln!("pull bench: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let registry = Registry::new(RegistryConfig { insecure: args.insecure.clone() });
        println!("image {} for {}", args.reference, args.platform);
        println!(
            "{:>4} {:>10} {:>10} {:>10} {:>12} {:>8}",
            "run", "pull ms", "unpack ms", "total ms", "layer bytes", "layers"
        );
        for run in 0..args.runs {
            let dir = match &args.keep {
                Some(d) => {
                    let d = d.join(format!("run-{run}"));
                    let _ = std::fs::remove_dir_all(&d);
                    d
                }
                None => tempfile::tempdir().expect("temp dir").keep(),
            };
            let store = ImageStore::open(&dir, BlobStore::open(&dir).expect("blob store")).expect("image store");
            let t0 = Instant::now();
            let image = match store.pull(&registry, &args.reference, &args.platform).await {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("pull failed: {e}");
                    std::process::exit(1);
                }
            };
            let pulled = t0.elapsed();
            let t1 = Instant::now();
            if let Err(e) = store.unpack(&image).await {
                eprintln!("unpack failed: {e}");
                std::process::exit(1);
            }
            let unpacked = t1.elapsed();
            let bytes: u64 = image.layers.iter().map(|l| l.size).sum();
            println!(
                "{:>4} {:>10} {:>10} {:>10} {:>12} {:>8}",
                run,
                pulled.as_millis(),
                unpacked.as_millis(),
                (pulled + unpacked).as_millis(),
                bytes,
                image.layers.len()
            );
            if args.keep.is_none() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    });
}
