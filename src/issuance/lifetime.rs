//! How long a certificate is valid: by type, configurable, capped at the DSC's notAfter, and
//! refused when the DSC is not yet valid or the certificate would be born expired.

use time::{Duration, OffsetDateTime, Time};

use super::IssueError;
use crate::config::ValidityConfig;
use crate::dcc::{CertType, Dcc};
use crate::keys::Dsc;

/// Lifetimes by type.
#[derive(Debug, Clone, Copy)]
pub struct LifetimePolicy {
    /// Test: after the sample time (default 72 h).
    pub test: Duration,
    /// Vaccination: after issuance (default 270 days).
    pub vaccination: Duration,
    /// Recovery: at most this long after issuance (default 180 days), never after `du`.
    pub recovery: Duration,
}

impl Default for LifetimePolicy {
    fn default() -> Self {
        LifetimePolicy::from_config(&ValidityConfig::default())
    }
}

impl LifetimePolicy {
    /// From the `[validity]` section.
    pub fn from_config(v: &ValidityConfig) -> Self {
        LifetimePolicy {
            test: Duration::hours(v.test_hours.into()),
            vaccination: Duration::days(v.vaccination_days.into()),
            recovery: Duration::days(v.recovery_days.into()),
        }
    }
}

/// `(iat, exp)` in Unix seconds for a validated payload signed by `dsc` at `now`.
///
/// - test: sample time (`sc`) + `test`;
/// - vaccination: `iat` + `vaccination`;
/// - recovery: the earlier of `iat` + `recovery` and the end of the day `du` (00:00 UTC of the
///   following day);
///
/// then capped at the DSC's notAfter (shell model: a verifier refuses `exp` after it). Refused
/// when `iat` is before the DSC's notBefore or the result is not after `iat`.
pub fn expiry(
    dcc: &Dcc,
    policy: &LifetimePolicy,
    dsc: &Dsc,
    now: OffsetDateTime,
) -> Result<(i64, i64), IssueError> {
    let iat = now.unix_timestamp();
    let exp = match dcc.cert_type() {
        CertType::Test => {
            let sc = dcc.sample_time().ok_or_else(|| IssueError::Lifetime {
                field: "t[0].sc",
                message: "sample time missing".into(),
            })?;
            sc + policy.test
        }
        CertType::Vaccination => now + policy.vaccination,
        CertType::Recovery => {
            let cap = now + policy.recovery;
            match dcc.recovery_valid_until() {
                Some(du) => {
                    let end_of_du = du.with_time(Time::MIDNIGHT).assume_utc() + Duration::days(1);
                    cap.min(end_of_du)
                }
                None => cap,
            }
        }
    };
    if iat < dsc.not_before.unix_timestamp() {
        return Err(IssueError::SignerNotYetValid {
            not_before: dsc.not_before,
        });
    }
    let exp = exp.unix_timestamp().min(dsc.not_after.unix_timestamp());
    if exp <= iat {
        let field = match dcc.cert_type() {
            CertType::Test => "t[0].sc",
            CertType::Vaccination => "v[0]",
            CertType::Recovery => "r[0].du",
        };
        return Err(IssueError::Lifetime {
            field,
            message: "the certificate would already be expired when issued".into(),
        });
    }
    Ok((iat, exp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcc::{validate, Policy};
    use serde_json::json;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-23 10:00 UTC);

    fn dsc(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Dsc {
        let key = p256::SecretKey::from_slice(&[7u8; 32])
            .unwrap()
            .public_key();
        Dsc {
            label: "t".into(),
            cert_der: vec![],
            kid: [0; 8],
            not_before,
            not_after,
            eku_types: None,
            public_key: key,
        }
    }

    fn payload(key: &str, entry: serde_json::Value) -> Dcc {
        let mut p = json!({"ver": "1.3.0", "nam": {"fnt": "A"}, "dob": "1980"});
        p[key] = json!([entry]);
        let t = CertType::from_payload_key(key).unwrap();
        validate(&p, Some(t), &Policy::default(), NOW).unwrap()
    }

    fn test_at(sc: &str) -> Dcc {
        payload(
            "t",
            json!({"tg": "840539006", "tt": "LP6464-4", "sc": sc, "tr": "260415000", "co": "SE", "is": "I"}),
        )
    }

    fn long_dsc() -> Dsc {
        dsc(NOW - Duration::days(10), NOW + Duration::days(700))
    }

    #[test]
    fn by_type() {
        let p = LifetimePolicy::default();
        let (iat, exp) = expiry(&test_at("2026-11-23T08:00:00Z"), &p, &long_dsc(), NOW).unwrap();
        assert_eq!(iat, NOW.unix_timestamp());
        assert_eq!(
            exp,
            datetime!(2026-11-26 08:00 UTC).unix_timestamp(),
            "sample + 72 h"
        );

        let v = payload(
            "v",
            json!({"tg": "840539006", "vp": "J07BX03", "mp": "EU/1/20/1528", "ma": "ORG-100030215", "dn": 1, "sd": 2, "dt": "2026-11-20", "co": "SE", "is": "I"}),
        );
        let (_, exp) = expiry(&v, &p, &long_dsc(), NOW).unwrap();
        assert_eq!(exp, (NOW + Duration::days(270)).unix_timestamp());

        let r = |du: &str| {
            payload(
                "r",
                json!({"tg": "840539006", "fr": "2026-11-01", "df": "2026-11-12", "du": du, "co": "SE", "is": "I"}),
            )
        };
        let (_, exp) = expiry(&r("2027-04-30"), &p, &long_dsc(), NOW).unwrap();
        assert_eq!(
            exp,
            datetime!(2027-05-01 00:00 UTC).unix_timestamp(),
            "end of du"
        );
        let (_, exp) = expiry(&r("2028-01-01"), &p, &long_dsc(), NOW).unwrap();
        assert_eq!(
            exp,
            (NOW + Duration::days(180)).unix_timestamp(),
            "capped at 180 days"
        );
    }

    #[test]
    fn configurable_and_capped_at_dsc_not_after() {
        let p = LifetimePolicy {
            test: Duration::hours(24),
            ..LifetimePolicy::default()
        };
        let (_, exp) = expiry(&test_at("2026-11-23T08:00:00Z"), &p, &long_dsc(), NOW).unwrap();
        assert_eq!(exp, datetime!(2026-11-24 08:00 UTC).unix_timestamp());
        let short = dsc(NOW - Duration::days(1), NOW + Duration::hours(5));
        let (_, exp) = expiry(
            &test_at("2026-11-23T08:00:00Z"),
            &LifetimePolicy::default(),
            &short,
            NOW,
        )
        .unwrap();
        assert_eq!(exp, (NOW + Duration::hours(5)).unix_timestamp());
    }

    #[test]
    fn refusals() {
        let p = LifetimePolicy::default();
        // Sample 4 days old: valid input, but sc + 72 h is already past.
        let e = expiry(&test_at("2026-11-19T08:00:00Z"), &p, &long_dsc(), NOW).unwrap_err();
        assert!(
            matches!(
                e,
                IssueError::Lifetime {
                    field: "t[0].sc",
                    ..
                }
            ),
            "{e}"
        );
        // DSC not valid yet.
        let future = dsc(NOW + Duration::hours(1), NOW + Duration::days(700));
        let e = expiry(&test_at("2026-11-23T08:00:00Z"), &p, &future, NOW).unwrap_err();
        assert!(matches!(e, IssueError::SignerNotYetValid { .. }), "{e}");
        // DSC expiring now: exp would not be after iat.
        let ending = dsc(NOW - Duration::days(700), NOW);
        assert!(expiry(&test_at("2026-11-23T08:00:00Z"), &p, &ending, NOW).is_err());
    }
}
