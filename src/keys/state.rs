//! The states of a managed key and the one path through them.

use std::fmt;
use std::str::FromStr;

/// Where a key is in its life: generated → certified → published → active → retired →
/// destroyed. No other transition exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyState {
    /// The key pair exists in the HSM; no certificate yet.
    Generated,
    /// A certificate from a configured CSCA was imported and checked.
    Certified,
    /// The upload package for the EU gateway was produced.
    Published,
    /// Signs new requests of its types.
    Active,
    /// Signs nothing more; stays in the trust list while its certificates are valid.
    Retired,
    /// The private key object was removed from the HSM.
    Destroyed,
}

impl KeyState {
    /// All states in order.
    pub const ALL: [KeyState; 6] = [
        KeyState::Generated,
        KeyState::Certified,
        KeyState::Published,
        KeyState::Active,
        KeyState::Retired,
        KeyState::Destroyed,
    ];

    /// Name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Generated => "generated",
            KeyState::Certified => "certified",
            KeyState::Published => "published",
            KeyState::Active => "active",
            KeyState::Retired => "retired",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// The state that may follow this one.
    pub fn next(self) -> Option<KeyState> {
        match self {
            KeyState::Generated => Some(KeyState::Certified),
            KeyState::Certified => Some(KeyState::Published),
            KeyState::Published => Some(KeyState::Active),
            KeyState::Active => Some(KeyState::Retired),
            KeyState::Retired => Some(KeyState::Destroyed),
            KeyState::Destroyed => None,
        }
    }

    /// The command that moves a key out of this state, for messages.
    pub fn next_step(self) -> &'static str {
        match self {
            KeyState::Generated => "import-cert (after csr)",
            KeyState::Certified => "publish",
            KeyState::Published => "activate",
            KeyState::Active => "retire",
            KeyState::Retired => "destroy",
            KeyState::Destroyed => "none: the key is gone",
        }
    }

    /// Checks that `to` may follow; the error names the current state and the allowed step.
    pub fn check(self, to: KeyState) -> Result<(), String> {
        if self.next() == Some(to) {
            Ok(())
        } else {
            Err(format!(
                "the key is {}; it cannot become {} (allowed next step: {})",
                self,
                to,
                self.next_step()
            ))
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        KeyState::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown key state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_next_state_is_allowed() {
        for from in KeyState::ALL {
            for to in KeyState::ALL {
                let ok = from.check(to).is_ok();
                let idx = |k: KeyState| KeyState::ALL.iter().position(|x| *x == k).unwrap();
                assert_eq!(ok, idx(to) == idx(from) + 1, "{from} -> {to}");
            }
            assert_eq!(from.as_str().parse::<KeyState>().unwrap(), from);
        }
        let e = KeyState::Generated.check(KeyState::Active).unwrap_err();
        assert!(
            e.contains("the key is generated") && e.contains("import-cert"),
            "{e}"
        );
    }
}
