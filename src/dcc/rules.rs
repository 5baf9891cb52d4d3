//! Validation rules, their stable codes and the errors they produce.
//!
//! Every content rule has a code in the Swedish API's `2-60-1001` family (`2-60-1001-NN`) and a
//! stable kebab-case name. Codes and names never change meaning; new rules get new numbers.

use std::fmt;

/// Defines [`Rule`] with its code and name from one table.
macro_rules! rules {
    ($( $(#[doc = $doc:literal])* $variant:ident = $code:literal, $name:literal; )*) => {
        /// A validation rule.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Rule {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Rule {
            /// Every rule, for documentation and tests.
            pub const ALL: &'static [Rule] = &[ $( Rule::$variant, )* ];

            /// The stable code.
            pub fn code(self) -> &'static str {
                match self { $( Rule::$variant => $code, )* }
            }

            /// The stable name.
            pub fn name(self) -> &'static str {
                match self { $( Rule::$variant => $name, )* }
            }
        }
    };
}

rules! {
    /// The payload is not well-formed JSON (or CBOR).
    Syntax = "2-60-1001-01", "syntax";
    /// The payload (or a group) is not a JSON object.
    NotAnObject = "2-60-1001-02", "not-an-object";
    /// A required field is missing.
    Required = "2-60-1001-03", "required";
    /// A field has the wrong JSON type (e.g. a string where an integer belongs).
    WrongType = "2-60-1001-04", "wrong-type";
    /// A field that the schema does not define (refused: we sign only what we understand).
    UnknownField = "2-60-1001-05", "unknown-field";
    /// Not exactly one of `v`, `t`, `r`.
    ExactlyOneStatement = "2-60-1001-06", "exactly-one-statement";
    /// A statement array does not hold exactly one entry.
    ExactlyOneEntry = "2-60-1001-07", "exactly-one-entry";
    /// A text is longer than the schema allows.
    TooLong = "2-60-1001-08", "too-long";
    /// `ver` is not a semantic version with major version 1.
    Version = "2-60-1001-09", "version";
    /// Neither `fnt` nor `gnt` is present.
    StandardisedNameRequired = "2-60-1001-10", "standardised-name-required";
    /// `fnt`/`gnt` does not match `^[A-Z<]*$`.
    StandardisedNameFormat = "2-60-1001-11", "standardised-name-format";
    /// `dob` is not `YYYY-MM-DD`, `YYYY-MM`, `YYYY` (1900–2099) or empty, or not a real date.
    DateOfBirthFormat = "2-60-1001-12", "date-of-birth-format";
    /// A date is not a complete, real `YYYY-MM-DD` date.
    DateFormat = "2-60-1001-13", "date-format";
    /// A date-time is not RFC 3339 `YYYY-MM-DDThh:mm:ssZ` or with a `±hh:mm` offset.
    DateTimeFormat = "2-60-1001-14", "date-time-format";
    /// A code is not in its EU value set.
    ValueSet = "2-60-1001-15", "value-set";
    /// `tg` is not COVID-19 (`840539006`).
    DiseaseNotCovid19 = "2-60-1001-16", "disease-not-covid-19";
    /// `ci` is not a UVCI (`URN:UVCI:01:CC:…`, characters A-Z 0-9 / : and an optional `#` check).
    UvciFormat = "2-60-1001-17", "uvci-format";
    /// The UVCI's country is not the issuing country.
    UvciCountry = "2-60-1001-18", "uvci-country";
    /// `co` is not the issuing country.
    CountryNotIssuer = "2-60-1001-19", "country-not-issuer";
    /// The payload holds another certificate type than requested.
    TypeMismatch = "2-60-1001-20", "type-mismatch";
    /// A test certificate is issued only for a negative result (`260415000`).
    TestResultNotNegative = "2-60-1001-21", "test-result-not-negative";
    /// A rapid antigen test must name its device (`ma`).
    RatDeviceRequired = "2-60-1001-22", "rat-device-required";
    /// The sample was taken in the future.
    SampleInFuture = "2-60-1001-23", "sample-in-future";
    /// The sample is older than the configured maximum age (7 days by default).
    SampleTooOld = "2-60-1001-24", "sample-too-old";
    /// `dn` or `sd` is not an integer ≥ 1.
    DoseRange = "2-60-1001-25", "dose-range";
    /// `dn` > `sd` where that is not booster notation.
    DoseExceedsSeries = "2-60-1001-26", "dose-exceeds-series";
    /// A date lies in the future.
    DateInFuture = "2-60-1001-27", "date-in-future";
    /// Recovery dates are not ordered `fr ≤ df ≤ du`.
    RecoveryDateOrder = "2-60-1001-28", "recovery-date-order";
    /// A UVCI the caller gives is outside its namespace `URN:UVCI:01:<CC>:<prefix>/…`.
    UvciNamespace = "2-60-1001-29", "uvci-namespace";
}

/// One problem with one field. The message never contains a value from the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where: `nam.fnt`, `t[0].sc`, or `$` for the payload as a whole.
    pub path: String,
    /// Which rule.
    pub rule: Rule,
    /// Human-readable explanation.
    pub message: String,
}

impl FieldError {
    /// A new error.
    pub fn new(path: impl Into<String>, rule: Rule, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            rule,
            message: message.into(),
        }
    }

    /// The rule's stable code.
    pub fn code(&self) -> &'static str {
        self.rule.code()
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} [{} {}]",
            self.path,
            self.message,
            self.rule.code(),
            self.rule.name()
        )
    }
}

/// All problems found in a payload (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

impl ValidationErrors {
    /// Whether any error is for `path` with `rule`.
    pub fn has(&self, path: &str, rule: Rule) -> bool {
        self.0.iter().any(|e| e.path == path && e.rule == rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_are_unique() {
        let codes: std::collections::HashSet<_> = Rule::ALL.iter().map(|r| r.code()).collect();
        let names: std::collections::HashSet<_> = Rule::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(codes.len(), Rule::ALL.len());
        assert_eq!(names.len(), Rule::ALL.len());
        assert!(codes.iter().all(|c| c.starts_with("2-60-1001-")));
    }
}
