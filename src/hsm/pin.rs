//! Where the token PIN comes from: a file or an environment variable, never the command line.
//! The PIN is held in a `SecretString` (zeroised on drop) and never logged.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::HsmError;

/// A PIN source as written in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinSource {
    /// Read the PIN from this file (first line, surrounding white space removed). The file must
    /// not be readable or writable by group or others.
    File(PathBuf),
    /// Read the PIN from this environment variable.
    Env(String),
}

/// Reads the PIN from its source. Relative file paths are resolved against `base`.
pub fn load_pin(source: &PinSource, base: &Path) -> Result<SecretString, HsmError> {
    match source {
        PinSource::File(path) => {
            let path = if path.is_relative() {
                base.join(path)
            } else {
                path.clone()
            };
            check_file_mode(&path)?;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| HsmError::Pin(format!("cannot read {}: {e}", path.display())))?;
            let pin = text.lines().next().unwrap_or("").trim().to_string();
            drop(zeroize::Zeroizing::new(text));
            if pin.is_empty() {
                return Err(HsmError::Pin(format!("{} is empty", path.display())));
            }
            Ok(SecretString::from(pin))
        }
        PinSource::Env(var) => match std::env::var(var) {
            Ok(pin) if !pin.trim().is_empty() => Ok(SecretString::from(pin.trim().to_string())),
            Ok(_) => Err(HsmError::Pin(format!(
                "environment variable {var} is empty"
            ))),
            Err(_) => Err(HsmError::Pin(format!(
                "environment variable {var} is not set"
            ))),
        },
    }
}

#[cfg(unix)]
fn check_file_mode(path: &Path) -> Result<(), HsmError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| HsmError::Pin(format!("cannot read {}: {e}", path.display())))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(HsmError::Pin(format!(
            "{} is accessible by group or others (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_file_mode(_path: &Path) -> Result<(), HsmError> {
    Ok(())
}

/// Writes a new file readable by the owner only (mode 0600, created exclusively, synced): PIN
/// files and development TLS keys.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn refuses_world_readable_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "1234\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_pin(&PinSource::File(p.clone()), dir.path()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pin = load_pin(&PinSource::File("pin".into()), dir.path()).unwrap();
        assert_eq!(pin.expose_secret(), "1234");
    }

    #[test]
    fn env_source() {
        let err = load_pin(
            &PinSource::Env("DCCSIGN_TEST_NO_SUCH_VAR".into()),
            Path::new("."),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not set"));
    }
}
