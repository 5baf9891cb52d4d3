//! Unique vaccination certificate identifiers (UVCI, the `ci` field): syntax, generation and
//! the Luhn mod 38 check character (eHN guidelines Annex 2).

use rand::Rng;

use super::rules::Rule;

/// The check-character alphabet, in code order.
pub const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/:";

const OPAQUE_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const OPAQUE_LEN: usize = 16;

/// The Luhn mod N (N = 38) check character over the whole string, `URN:UVCI:` included.
/// `None` if a character is outside [`ALPHABET`].
pub fn luhn_mod38(input: &str) -> Option<char> {
    let n = ALPHABET.len() as u32;
    let mut factor = 2;
    let mut sum = 0;
    for c in input.chars().rev() {
        let code = ALPHABET.find(c)? as u32;
        let mut addend = factor * code;
        factor = if factor == 2 { 1 } else { 2 };
        addend = addend / n + addend % n;
        sum += addend;
    }
    let check = (n - sum % n) % n;
    ALPHABET.chars().nth(check as usize)
}

/// A new UVCI: `URN:UVCI:01:<CC>:<prefix>/<16 random A-Z0-9>#<check>`.
pub fn generate(country: &str, issuer_prefix: &str, rng: &mut impl rand::RngCore) -> String {
    let opaque: String = (0..OPAQUE_LEN)
        .map(|_| OPAQUE_CHARS[rng.gen_range(0..OPAQUE_CHARS.len())] as char)
        .collect();
    let body = format!("URN:UVCI:01:{country}:{issuer_prefix}/{opaque}");
    match luhn_mod38(&body) {
        Some(c) => format!("{body}#{c}"),
        None => body,
    }
}

/// A UVCI whose opaque part is derived from `digest` (e.g. an HMAC kept in the HSM over the
/// caller and its request id): the same digest always gives the same UVCI, so an idempotent
/// replay can rebuild it without the ledger storing it. 16 characters of A-Z0-9 (~82 bits) from
/// the first 128 bits of the digest.
pub fn from_digest(country: &str, issuer_prefix: &str, digest: &[u8; 32]) -> String {
    let mut n = u128::from_be_bytes(digest[..16].try_into().unwrap_or([0; 16]));
    let mut opaque = [b'0'; OPAQUE_LEN];
    for c in opaque.iter_mut().rev() {
        *c = OPAQUE_CHARS[(n % OPAQUE_CHARS.len() as u128) as usize];
        n /= OPAQUE_CHARS.len() as u128;
    }
    let body = format!(
        "URN:UVCI:01:{country}:{issuer_prefix}/{}",
        String::from_utf8_lossy(&opaque)
    );
    match luhn_mod38(&body) {
        Some(c) => format!("{body}#{c}"),
        None => body,
    }
}

/// Whether `ci` (syntactically a UVCI: see [`check_syntax`]) is in the namespace of
/// `issuer_prefix`: `[URN:UVCI:]01:<CC>:<issuer_prefix>/…`, as [`generate`] makes them.
pub fn in_namespace(ci: &str, issuer_prefix: &str) -> bool {
    let rest = ci.strip_prefix("URN:UVCI:").unwrap_or(ci);
    let Some((_country, body)) = rest.strip_prefix("01:").and_then(|r| r.split_once(':')) else {
        return false;
    };
    body.strip_prefix(issuer_prefix)
        .and_then(|r| r.strip_prefix('/'))
        .is_some_and(|opaque| !opaque.is_empty() && !opaque.starts_with('#'))
}

/// Checks UVCI syntax: optional `URN:UVCI:` prefix, version `01`, a two-letter country, a
/// non-empty body of `A-Z 0-9 / :`, an optional `#` and one check character; at most 80
/// characters. The check character is not verified (countries disagree on it in practice).
/// With `issuer_country`, the country must match.
pub fn check_syntax(ci: &str, issuer_country: Option<&str>) -> Result<(), (Rule, String)> {
    let fmt = |m: &str| Err((Rule::UvciFormat, m.to_string()));
    if ci.chars().count() > 80 {
        return Err((Rule::TooLong, "must be at most 80 characters".into()));
    }
    let rest = ci.strip_prefix("URN:UVCI:").unwrap_or(ci);
    let Some(rest) = rest.strip_prefix("01:") else {
        return fmt("must start with URN:UVCI:01: (version 01)");
    };
    let (country, body) = match rest.split_once(':') {
        Some(x) => x,
        None => return fmt("must have the form URN:UVCI:01:<country>:<identifier>"),
    };
    if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
        return fmt("the country part must be two upper-case letters");
    }
    let body = match body.split_once('#') {
        Some((b, check)) => {
            if check.chars().count() != 1 || !ALPHABET.contains(check) {
                return fmt("after '#' must come exactly one check character of A-Z 0-9 / :");
            }
            b
        }
        None => body,
    };
    if body.is_empty() {
        return fmt("the identifier part is empty");
    }
    if !body
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'/' || b == b':')
    {
        return fmt("only A-Z, 0-9, '/' and ':' are allowed (and '#' before the check character)");
    }
    if let Some(cc) = issuer_country {
        if country != cc {
            return Err((
                Rule::UvciCountry,
                "the UVCI's country is not the issuing country".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        assert!(in_namespace("URN:UVCI:01:SE:EHM/V12907267LAJW#E", "EHM"));
        assert!(in_namespace("01:SE:EHM/V1", "EHM"));
        assert!(in_namespace("URN:UVCI:01:SE:EHM/A/B", "EHM"));
        // Another issuer's, one whose prefix merely starts with ours, no prefix at all.
        assert!(!in_namespace("URN:UVCI:01:SE:ABC/V1", "EHM"));
        assert!(!in_namespace("URN:UVCI:01:SE:EHMX/V1", "EHM"));
        assert!(!in_namespace("URN:UVCI:01:SE:EHMV1", "EHM"));
        assert!(!in_namespace("URN:UVCI:01:SE:EHM", "EHM"));
        assert!(!in_namespace("URN:UVCI:01:SE:EHM/", "EHM"));
        assert!(!in_namespace("URN:UVCI:01:SE:EHM/#E", "EHM"));
        assert!(!in_namespace("URN:UVCI:02:SE:EHM/V1", "EHM"));
        let mut rng = rand::rngs::OsRng;
        assert!(in_namespace(&generate("SE", "DEV", &mut rng), "DEV"));
        assert!(in_namespace(&from_digest("SE", "DEV", &[7; 32]), "DEV"));
    }

    #[test]
    fn luhn_vector() {
        assert_eq!(luhn_mod38("URN:UVCI:01:NL:187/37512422923"), Some('Z'));
        assert_eq!(luhn_mod38("urn"), None);
    }

    #[test]
    fn generated_are_valid_short_and_unique() {
        let mut rng = rand::thread_rng();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let u = generate("SE", "DEV", &mut rng);
            assert!(u.len() <= 60, "{u}");
            check_syntax(&u, Some("SE")).unwrap();
            let (body, check) = u.split_once('#').unwrap();
            assert_eq!(luhn_mod38(body).unwrap().to_string(), check);
            assert!(seen.insert(u));
        }
    }

    #[test]
    fn derived_uvcis_are_deterministic_and_valid() {
        let a = from_digest("SE", "DEV", &[7; 32]);
        assert_eq!(a, from_digest("SE", "DEV", &[7; 32]));
        assert_ne!(a, from_digest("SE", "DEV", &[8; 32]));
        check_syntax(&a, Some("SE")).unwrap();
        let (body, check) = a.split_once('#').unwrap();
        assert_eq!(luhn_mod38(body).unwrap().to_string(), check);
        assert_eq!(body.len(), "URN:UVCI:01:SE:DEV/".len() + 16);
    }

    #[test]
    fn syntax() {
        assert!(check_syntax("URN:UVCI:01:SE:EHM/TARN89875439877", Some("SE")).is_ok());
        assert!(check_syntax("01:NL:DADFCC47C7334E45A906DB12FD859FB7", None).is_ok());
        assert!(check_syntax("URN:UVCI:01:SE:ABC#Q", None).is_ok());
        assert_eq!(
            check_syntax("URN:UVCI:01:NL:ABC", Some("SE"))
                .unwrap_err()
                .0,
            Rule::UvciCountry
        );
        assert_eq!(
            check_syntax("URN:UVCI:02:SE:ABC", None).unwrap_err().0,
            Rule::UvciFormat
        );
        assert_eq!(
            check_syntax("URN:UVCI:01:SE:abc", None).unwrap_err().0,
            Rule::UvciFormat
        );
        assert_eq!(
            check_syntax("URN:UVCI:01:SE:", None).unwrap_err().0,
            Rule::UvciFormat
        );
        assert_eq!(
            check_syntax("URN:UVCI:01:SE:A#", None).unwrap_err().0,
            Rule::UvciFormat
        );
        let long = format!("URN:UVCI:01:SE:{}", "A".repeat(70));
        assert_eq!(check_syntax(&long, None).unwrap_err().0, Rule::TooLong);
    }
}
