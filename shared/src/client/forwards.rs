//! `forwards.toml` in the client home: the forwards `tunnel-client up` keeps open, per device,
//! like ssh_config's `LocalForward`.
//!
//! ```toml
//! [device.cam]
//! forward = ["2222:ssh", "0.0.0.0:8554:rtsp"]
//!
//! [device.nas]
//! forward = ["8080:web"]
//! ```
//!
//! Kind: pure parsing, validation and comment-keeping edits ([`add`], [`remove`]), with
//! [`ForwardsFile::load`] and [`ClientHome::edit_forwards`] at the file edge. The file decides
//! which local ports are opened with this client's key, so like `device.toml` on the device it
//! is refused when another user could change it (OpenSSH's `StrictModes`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::forwarder::ForwardSpec;
use super::{ClientError, ClientHome};
use crate::config::{ConfigError, ValueError, check_id};
use crate::fsutil::{self, LockFile};

/// The header of a new file.
const HEADER: &str = "\
# Forwards `tunnel-client up` keeps open, per device (like ssh_config's LocalForward):
# [BIND:]PORT:SERVICE, BIND 127.0.0.1 unless given ([::1] for IPv6), PORT 0 for a free port.
# Edit by hand or with `tunnel-client forward add|remove`; `tunnel-client reload` (or SIGHUP)
# makes a running `up` apply it without touching the other forwards.
";

/// The parsed file: every device (a name, id or fingerprint prefix of a known device) and its
/// forwards, in the file's order per device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardsFile {
    /// Device reference → its forwards (never empty).
    pub devices: BTreeMap<String, Vec<ForwardSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    device: BTreeMap<String, RawDevice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    forward: Vec<String>,
}

impl ForwardsFile {
    /// Parses and validates the text: every entry a valid `[BIND:]PORT:SERVICE`, no entry twice
    /// for a device, no local address (other than port 0) used twice.
    ///
    /// # Errors
    /// [`ValueError`] naming the device and the entry, or TOML's message with its line.
    pub fn from_toml(text: &str) -> Result<Self, ValueError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ValueError(e.to_string()))?;
        let mut out = Self::default();
        let mut locals: HashMap<SocketAddr, String> = HashMap::new();
        for (device, entry) in raw.device {
            check_id("device", &device)?;
            let mut specs: Vec<ForwardSpec> = Vec::new();
            for text in &entry.forward {
                let spec: ForwardSpec = text
                    .parse()
                    .map_err(|e| ValueError(format!("device '{device}': {e}")))?;
                if specs.contains(&spec) {
                    return Err(ValueError(format!(
                        "device '{device}': forward '{text}' is listed twice"
                    )));
                }
                let local = SocketAddr::new(spec.bind, spec.port);
                let this = format!("{device}: {spec}");
                if spec.port != 0
                    && let Some(other) = locals.insert(local, this.clone())
                {
                    return Err(ValueError(format!(
                        "{local} is forwarded twice ({other}; {this}): give one of them another \
                         port"
                    )));
                }
                specs.push(spec);
            }
            if !specs.is_empty() {
                out.devices.insert(device, specs);
            }
        }
        Ok(out)
    }

    /// Every forward, as `(device, spec)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ForwardSpec)> {
        self.devices
            .iter()
            .flat_map(|(d, specs)| specs.iter().map(move |s| (d.as_str(), s)))
    }

    /// Loads `path`; a missing file has no forwards.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file: unreadable, untrusted, or invalid.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(&read(path)?).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.0,
        })
    }
}

/// The file's text ("" when missing), refused when another user could change it.
fn read(path: &Path) -> Result<String, ConfigError> {
    match fsutil::check_strict(path) {
        Ok(()) => {}
        Err(fsutil::Untrusted::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(String::new());
        }
        Err(fsutil::Untrusted::Io(source)) => {
            return Err(ConfigError::Io {
                path: path.to_owned(),
                source,
            });
        }
        Err(reason) => {
            return Err(ConfigError::Untrusted {
                path: path.to_owned(),
                reason,
            });
        }
    }
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })
}

fn parse_doc(text: &str) -> Result<toml_edit::DocumentMut, ValueError> {
    text.parse()
        .map_err(|e: toml_edit::TomlError| ValueError(e.to_string()))
}

/// `text` with `spec` added to `device`'s forwards (comments and layout kept).
///
/// # Errors
/// [`ValueError`] when it is there already, or the result would not be valid.
pub fn add(text: &str, device: &str, spec: &ForwardSpec) -> Result<String, ValueError> {
    check_id("device", device)?;
    let mut doc = parse_doc(text)?;
    let devices = doc
        .entry("device")
        .or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            toml_edit::Item::Table(t)
        })
        .as_table_mut()
        .ok_or_else(|| ValueError("'device' in forwards.toml must be a table".into()))?;
    let entry = devices
        .entry(device)
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()))
        .as_table_mut()
        .ok_or_else(|| ValueError(format!("'device.{device}' must be a table")))?;
    let list = entry
        .entry("forward")
        .or_insert_with(|| toml_edit::value(toml_edit::Array::new()))
        .as_array_mut()
        .ok_or_else(|| ValueError(format!("'device.{device}.forward' must be a list")))?;
    let present = list
        .iter()
        .filter_map(toml_edit::Value::as_str)
        .any(|s| s.parse::<ForwardSpec>().as_ref() == Ok(spec));
    if present {
        return Err(ValueError(format!(
            "device '{device}' already has the forward {spec}"
        )));
    }
    list.push(spec.to_string());
    let out = if text.trim().is_empty() {
        format!("{HEADER}\n{doc}")
    } else {
        doc.to_string()
    };
    ForwardsFile::from_toml(&out)?;
    Ok(out)
}

/// `text` without `device`'s forwards that match `what`: a `[BIND:]PORT:SERVICE`, or a bare
/// local port (every forward of the device on that port). A device left with no forward is
/// removed. Returns the new text and what was removed.
///
/// # Errors
/// [`ValueError`] when nothing matches.
pub fn remove(
    text: &str,
    device: &str,
    what: &str,
) -> Result<(String, Vec<ForwardSpec>), ValueError> {
    let matches: Box<dyn Fn(&ForwardSpec) -> bool> = match what.parse::<u16>() {
        Ok(port) => Box::new(move |s| s.port == port),
        Err(_) => {
            let spec: ForwardSpec = what.parse().map_err(ValueError)?;
            Box::new(move |s| *s == spec)
        }
    };
    let mut doc = parse_doc(text)?;
    let missing = || {
        ValueError(format!(
            "device '{device}' has no forward {what} in forwards.toml"
        ))
    };
    let devices = doc
        .get_mut("device")
        .and_then(toml_edit::Item::as_table_like_mut)
        .ok_or_else(missing)?;
    let list = devices
        .get_mut(device)
        .and_then(|d| d.get_mut("forward"))
        .and_then(toml_edit::Item::as_array_mut)
        .ok_or_else(missing)?;
    let mut removed = Vec::new();
    list.retain(|v| {
        let spec = v.as_str().and_then(|s| s.parse::<ForwardSpec>().ok());
        match spec {
            Some(spec) if matches(&spec) => {
                removed.push(spec);
                false
            }
            _ => true,
        }
    });
    if removed.is_empty() {
        return Err(missing());
    }
    if list.is_empty() {
        devices.remove(device);
    }
    let out = doc.to_string();
    ForwardsFile::from_toml(&out)?;
    Ok((out, removed))
}

impl ClientHome {
    /// `forwards.toml`.
    pub fn forwards_path(&self) -> PathBuf {
        self.dir().join("forwards.toml")
    }

    /// The forwards `up` keeps open.
    ///
    /// # Errors
    /// [`ClientError::Config`] for an unreadable, untrusted or invalid file.
    pub fn forwards(&self) -> Result<ForwardsFile, ClientError> {
        Ok(ForwardsFile::load(&self.forwards_path())?)
    }

    /// Locked read-modify-write of `forwards.toml` (atomic, 0600): `change` gets the current
    /// text and returns the new one.
    ///
    /// # Errors
    /// `change`'s error, or file errors; the file is unchanged on error.
    pub fn edit_forwards<R>(
        &self,
        change: impl FnOnce(&str) -> Result<(String, R), ValueError>,
    ) -> Result<R, ClientError> {
        let path = self.forwards_path();
        let lock_path = self.dir().join("forwards.lock");
        self.ensure_dir()?;
        let _lock = LockFile::acquire(&lock_path).map_err(ClientError::io(&lock_path))?;
        let (text, out) = change(&read(&path)?)?;
        fsutil::write_atomic(&path, text.as_bytes(), 0o600).map_err(ClientError::io(&path))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> ForwardSpec {
        s.parse().unwrap()
    }

    /// The sample shipped in `examples/config/` stays valid.
    #[test]
    fn shipped_sample_parses() {
        let f = ForwardsFile::from_toml(include_str!("../../../examples/config/forwards.toml"))
            .unwrap();
        assert_eq!(
            f.devices["cam"],
            vec![spec("2222:ssh"), spec("0.0.0.0:8554:rtsp")]
        );
        assert_eq!(f.devices["nas"], vec![spec("8080:web")]);
    }

    #[test]
    fn parses_and_validates() {
        let f = ForwardsFile::from_toml(
            "[device.cam]\nforward = [\"2222:ssh\", \"0.0.0.0:8554:rtsp\", \"0:web\"]\n\
             [device.nas]\nforward = [\"8080:web\", \"0:web\"]\n",
        )
        .unwrap();
        assert_eq!(
            f.devices["cam"],
            vec![spec("2222:ssh"), spec("0.0.0.0:8554:rtsp"), spec("0:web")]
        );
        assert_eq!(f.iter().count(), 5);
        assert_eq!(
            ForwardsFile::from_toml("").unwrap(),
            ForwardsFile::default()
        );
        for (bad, says) in [
            (
                "[device.cam]\nforward = [\"ssh\"]\n",
                "device 'cam': 'ssh' must look like",
            ),
            (
                "[device.cam]\nforward = [\"1:a\", \"1:a\"]\n",
                "listed twice",
            ),
            (
                "[device.a]\nforward = [\"2222:ssh\"]\n[device.b]\nforward = [\"2222:web\"]\n",
                "127.0.0.1:2222 is forwarded twice (a: 2222:ssh; b: 2222:web)",
            ),
            (
                "[device.cam]\nforwards = [\"1:a\"]\n",
                "unknown field `forwards`",
            ),
            ("[device.cam]\nforward = \"1:a\"\n", "invalid type"),
            (
                "[devices.cam]\nforward = [\"1:a\"]\n",
                "unknown field `devices`",
            ),
            ("[device.\"bad name\"]\nforward = [\"1:a\"]\n", "device"),
        ] {
            let e = ForwardsFile::from_toml(bad).unwrap_err();
            assert!(e.0.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn edits_keep_comments_and_validate() {
        let text = add("", "cam", &spec("2222:ssh")).unwrap();
        assert!(text.starts_with("# Forwards `tunnel-client up`"), "{text}");
        let text = text.replace("[device.cam]", "# my camera\n[device.cam]");
        let text = add(&text, "cam", &spec("0.0.0.0:8554:rtsp")).unwrap();
        let text = add(&text, "nas.lan", &spec("8080:web")).unwrap();
        assert!(text.contains("# my camera"), "{text}");
        let f = ForwardsFile::from_toml(&text).unwrap();
        assert_eq!(
            f.devices["cam"],
            vec![spec("2222:ssh"), spec("0.0.0.0:8554:rtsp")]
        );
        assert_eq!(f.devices["nas.lan"], vec![spec("8080:web")]);

        assert!(
            add(&text, "cam", &spec("127.0.0.1:2222:ssh"))
                .unwrap_err()
                .0
                .contains("already")
        );
        assert!(
            add(&text, "nas.lan", &spec("2222:x"))
                .unwrap_err()
                .0
                .contains("twice")
        );

        let (text, gone) = remove(&text, "cam", "8554").unwrap();
        assert_eq!(gone, vec![spec("0.0.0.0:8554:rtsp")]);
        let (text, gone) = remove(&text, "nas.lan", "8080:web").unwrap();
        assert_eq!(gone, vec![spec("8080:web")]);
        let f = ForwardsFile::from_toml(&text).unwrap();
        assert_eq!(f.devices.keys().collect::<Vec<_>>(), ["cam"]);
        assert!(text.contains("# my camera"));
        assert!(
            remove(&text, "cam", "9999")
                .unwrap_err()
                .0
                .contains("has no forward 9999")
        );
        assert!(remove(&text, "tv", "1:a").is_err());
        assert!(remove(&text, "cam", "not a spec").is_err());
    }

    #[test]
    fn the_home_refuses_a_file_others_can_change() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let home = ClientHome::new(dir.path().join("c"));
        assert_eq!(home.forwards().unwrap(), ForwardsFile::default());
        home.edit_forwards(|t| Ok((add(t, "cam", &spec("2222:ssh"))?, ())))
            .unwrap();
        let mode = std::fs::metadata(home.forwards_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            home.forwards().unwrap().devices["cam"],
            vec![spec("2222:ssh")]
        );
        std::fs::set_permissions(home.forwards_path(), std::fs::Permissions::from_mode(0o666))
            .unwrap();
        assert!(matches!(
            home.forwards(),
            Err(ClientError::Config(ConfigError::Untrusted { .. }))
        ));
    }
}
