//! The platform (os/architecture/variant) an image is pulled for, and choosing the entry of an
//! image index that matches it. Pure logic; it never reads the environment beyond the
//! compile-time target of [`Platform::host`].

use std::fmt;

use oci_spec::image as oci;
use serde::{Deserialize, Serialize};

/// An OCI platform: `os`/`architecture`[/`variant`], with Go's names (`linux`, `amd64`,
/// `arm64`, `arm` + `v7`...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `amd64`.
    pub architecture: String,
    /// CPU variant, e.g. `v7` for `arm`; `None` accepts any variant (preferring none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// A platform from its parts.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Self { os: os.to_owned(), architecture: architecture.to_owned(), variant: variant.map(str::to_owned) }
    }

    /// The platform this binary was built for (Linux, with Go's architecture names).
    pub fn host() -> Self {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Self::new("linux", arch, variant)
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty())?;
        let arch = parts.next().filter(|p| !p.is_empty())?;
        let variant = parts.next().filter(|p| !p.is_empty());
        if parts.next().is_some() {
            return None;
        }
        Some(Self::new(os, arch, variant))
    }

    /// How well an index entry for `os`/`arch`/`variant` fits: `None` if it does not, else
    /// a rank where higher is better (an exact variant beats an unspecified one).
    pub(crate) fn fit(&self, os: &str, arch: &str, variant: Option<&str>) -> Option<u8> {
        if os != self.os || arch != self.architecture {
            return None;
        }
        // arm64 without a variant means v8.
        let norm = |v: Option<&str>| match (arch, v) {
            ("arm64", None) => Some("v8".to_owned()),
            (_, v) => v.map(str::to_owned),
        };
        match (&self.variant, variant) {
            (None, None) => Some(2),
            (None, Some(_)) => Some(1),
            (Some(want), got) => (norm(Some(want)) == norm(got)).then_some(2),
        }
    }

    /// [`Platform::fit`] of an index entry's platform.
    pub(crate) fn fit_entry(&self, entry: &oci::Platform) -> Option<u8> {
        let entry = Platform::from(entry);
        self.fit(&entry.os, &entry.architecture, entry.variant.as_deref())
    }
}

/// The platform an index entry names. oci-spec keeps `os` and `architecture` as enums that
/// give back the names they were read from, save one: it reads `armbe` as `arm64be`.
impl From<&oci::Platform> for Platform {
    fn from(p: &oci::Platform) -> Self {
        Self { os: p.os().to_string(), architecture: p.architecture().to_string(), variant: p.variant().clone() }
    }
}

/// The platform of an index entry Flotilla writes (no OS version or features).
impl From<&Platform> for oci::Platform {
    fn from(p: &Platform) -> Self {
        let mut out = oci::Platform::default();
        out.set_os(p.os.as_str().into())
            .set_architecture(p.architecture.as_str().into())
            .set_variant(p.variant.clone());
        out
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let p = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(p, Platform::new("linux", "arm", Some("v7")));
        assert_eq!(p.to_string(), "linux/arm/v7");
        assert_eq!(Platform::parse("linux/amd64").unwrap().to_string(), "linux/amd64");
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d"] {
            assert!(Platform::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(Platform::host().os, "linux");
    }

    #[test]
    fn fit() {
        let amd64 = Platform::new("linux", "amd64", None);
        assert_eq!(amd64.fit("linux", "amd64", None), Some(2));
        assert_eq!(amd64.fit("linux", "amd64", Some("v3")), Some(1));
        assert_eq!(amd64.fit("linux", "arm64", None), None);
        assert_eq!(amd64.fit("windows", "amd64", None), None);
        let v7 = Platform::new("linux", "arm", Some("v7"));
        assert_eq!(v7.fit("linux", "arm", Some("v7")), Some(2));
        assert_eq!(v7.fit("linux", "arm", Some("v6")), None);
        assert_eq!(v7.fit("linux", "arm", None), None);
        let v8 = Platform::new("linux", "arm64", Some("v8"));
        assert_eq!(v8.fit("linux", "arm64", None), Some(2));
        assert_eq!(v7.fit_entry(&(&Platform::new("linux", "arm", Some("v7"))).into()), Some(2));
    }

    #[test]
    fn oci_platforms_keep_their_names() {
        for p in ["linux/amd64", "linux/arm64/v8", "linux/arm/v7", "linux/386", "linux/loong64", "wasip1/wasm", "x/y/z"]
        {
            let ours = Platform::parse(p).unwrap();
            let theirs = oci::Platform::from(&ours);
            assert_eq!(Platform::from(&theirs), ours);
            let json = serde_json::to_string(&theirs).unwrap();
            assert!(
                json.starts_with(&format!(r#"{{"architecture":"{}","os":"{}""#, ours.architecture, ours.os)),
                "{json}"
            );
        }
    }
}
