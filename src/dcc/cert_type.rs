//! The three kinds of EU digital COVID certificate.

use std::fmt;
use std::str::FromStr;

/// Which statement a certificate carries: exactly one of `t`, `v` or `r` in the payload.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CertType {
    /// A negative test result (`t`).
    Test,
    /// A vaccination (`v`).
    Vaccination,
    /// A recovery from a positive NAAT (`r`).
    Recovery,
}

impl CertType {
    /// All types, in a stable order.
    pub const ALL: [CertType; 3] = [CertType::Test, CertType::Vaccination, CertType::Recovery];

    /// The lower-case name used on the command line, in config and in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            CertType::Test => "test",
            CertType::Vaccination => "vaccination",
            CertType::Recovery => "recovery",
        }
    }

    /// The payload key of the statement array: `t`, `v` or `r`.
    pub fn payload_key(self) -> &'static str {
        match self {
            CertType::Test => "t",
            CertType::Vaccination => "v",
            CertType::Recovery => "r",
        }
    }

    /// The type for a payload key (`t`, `v`, `r`).
    pub fn from_payload_key(key: &str) -> Option<CertType> {
        match key {
            "t" => Some(CertType::Test),
            "v" => Some(CertType::Vaccination),
            "r" => Some(CertType::Recovery),
            _ => None,
        }
    }

    /// The extended-key-usage OID that restricts a DSC to this type
    /// (eHN certificate governance; `1.3.6.1.4.1.1847.2021.1.{1,2,3}`).
    pub fn eku_oid(self) -> &'static str {
        match self {
            CertType::Test => "1.3.6.1.4.1.1847.2021.1.1",
            CertType::Vaccination => "1.3.6.1.4.1.1847.2021.1.2",
            CertType::Recovery => "1.3.6.1.4.1.1847.2021.1.3",
        }
    }

    /// The type for an extended-key-usage OID. Accepts the correct OIDs and the variant with the
    /// extra `.0` arc (`1.3.6.1.4.1.0.1847.2021.1.x`) that circulated in test data; we never issue it.
    pub fn from_eku_oid(oid: &str) -> Option<CertType> {
        let tail = oid
            .strip_prefix("1.3.6.1.4.1.1847.2021.1.")
            .or_else(|| oid.strip_prefix("1.3.6.1.4.1.0.1847.2021.1."))?;
        match tail {
            "1" => Some(CertType::Test),
            "2" => Some(CertType::Vaccination),
            "3" => Some(CertType::Recovery),
            _ => None,
        }
    }
}

impl fmt::Display for CertType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for an unknown certificate type name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown certificate type {0:?}: expected test, vaccination or recovery")]
pub struct UnknownCertType(pub String);

impl FromStr for CertType {
    type Err = UnknownCertType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "test" | "t" => Ok(CertType::Test),
            "vaccination" | "v" => Ok(CertType::Vaccination),
            "recovery" | "r" => Ok(CertType::Recovery),
            other => Err(UnknownCertType(other.to_string())),
        }
    }
}
