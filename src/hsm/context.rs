//! The process-wide PKCS#11 context. `C_Initialize` runs once per module per process: calling it
//! twice is an error in PKCS#11 and crashes some modules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use super::HsmError;

static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// The initialised context for `module`, loading and initialising it on first use.
pub(crate) fn context(module: &Path) -> Result<Pkcs11, HsmError> {
    let map = CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ctx) = map.get(module) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(module).map_err(|e| HsmError::Module {
        module: module.display().to_string(),
        reason: e.to_string(),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e.into()),
    }
    map.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}
