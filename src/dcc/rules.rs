//! Validation rules, their stable codes and the errors they produce.
//!
//! Every content rule has a code in the Swedish API's `2-60-1001` family (`2-60-1001-NN`) and a
//! stable kebab-case name. Codes and names never change meaning; new rules get new numbers.

use std::fmt;

/// A validation rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// The payload is not well-formed JSON (or CBOR).
    Syntax,
    /// The payload (or a group) is not a JSON object.
    NotAnObject,
    /// A required field is missing.
    Required,
    /// A field has the wrong JSON type (e.g. a string where an integer belongs).
    WrongType,
    /// A field that the schema does not define (refused: we sign only what we understand).
    UnknownField,
    /// Not exactly one of `v`, `t`, `r`.
    ExactlyOneStatement,
    /// A statement array does not hold exactly one entry.
    ExactlyOneEntry,
    /// A text is longer than the schema allows.
    TooLong,
    /// `ver` is not a semantic version with major version 1.
    Version,
    /// Neither `fnt` nor `gnt` is present.
    StandardisedNameRequired,
    /// `fnt`/`gnt` does not match `^[A-Z<]*$`.
    StandardisedNameFormat,
    /// `dob` is not `YYYY-MM-DD`, `YYYY-MM`, `YYYY` (1900–2099) or empty, or not a real date.
    DateOfBirthFormat,
    /// A date is not a complete, real `YYYY-MM-DD` date.
    DateFormat,
    /// A date-time is not RFC 3339 `YYYY-MM-DDThh:mm:ssZ` or with a `±hh:mm` offset.
    DateTimeFormat,
    /// A code is not in its EU value set.
    ValueSet,
    /// `tg` is not COVID-19 (`840539006`).
    DiseaseNotCovid19,
    /// `ci` is not a UVCI (`URN:UVCI:01:CC:…`, characters A-Z 0-9 / : and an optional `#` check).
    UvciFormat,
    /// The UVCI's country is not the issuing country.
    UvciCountry,
    /// `co` is not the issuing country.
    CountryNotIssuer,
    /// The payload holds another certificate type than requested.
    TypeMismatch,
    /// A test certificate is issued only for a negative result (`260415000`).
    TestResultNotNegative,
    /// A rapid antigen test must name its device (`ma`).
    RatDeviceRequired,
    /// The sample was taken in the future.
    SampleInFuture,
    /// The sample is older than the configured maximum age (7 days by default).
    SampleTooOld,
    /// `dn` or `sd` is not an integer ≥ 1.
    DoseRange,
    /// `dn` > `sd` where that is not booster notation.
    DoseExceedsSeries,
    /// A date lies in the future.
    DateInFuture,
    /// Recovery dates are not ordered `fr ≤ df ≤ du`.
    RecoveryDateOrder,
}

impl Rule {
    /// The stable code.
    pub fn code(self) -> &'static str {
        use Rule::*;
        match self {
            Syntax => "2-60-1001-01",
            NotAnObject => "2-60-1001-02",
            Required => "2-60-1001-03",
            WrongType => "2-60-1001-04",
            UnknownField => "2-60-1001-05",
            ExactlyOneStatement => "2-60-1001-06",
            ExactlyOneEntry => "2-60-1001-07",
            TooLong => "2-60-1001-08",
            Version => "2-60-1001-09",
            StandardisedNameRequired => "2-60-1001-10",
            StandardisedNameFormat => "2-60-1001-11",
            DateOfBirthFormat => "2-60-1001-12",
            DateFormat => "2-60-1001-13",
            DateTimeFormat => "2-60-1001-14",
            ValueSet => "2-60-1001-15",
            DiseaseNotCovid19 => "2-60-1001-16",
            UvciFormat => "2-60-1001-17",
            UvciCountry => "2-60-1001-18",
            CountryNotIssuer => "2-60-1001-19",
            TypeMismatch => "2-60-1001-20",
            TestResultNotNegative => "2-60-1001-21",
            RatDeviceRequired => "2-60-1001-22",
            SampleInFuture => "2-60-1001-23",
            SampleTooOld => "2-60-1001-24",
            DoseRange => "2-60-1001-25",
            DoseExceedsSeries => "2-60-1001-26",
            DateInFuture => "2-60-1001-27",
            RecoveryDateOrder => "2-60-1001-28",
        }
    }

    /// The stable name.
    pub fn name(self) -> &'static str {
        use Rule::*;
        match self {
            Syntax => "syntax",
            NotAnObject => "not-an-object",
            Required => "required",
            WrongType => "wrong-type",
            UnknownField => "unknown-field",
            ExactlyOneStatement => "exactly-one-statement",
            ExactlyOneEntry => "exactly-one-entry",
            TooLong => "too-long",
            Version => "version",
            StandardisedNameRequired => "standardised-name-required",
            StandardisedNameFormat => "standardised-name-format",
            DateOfBirthFormat => "date-of-birth-format",
            DateFormat => "date-format",
            DateTimeFormat => "date-time-format",
            ValueSet => "value-set",
            DiseaseNotCovid19 => "disease-not-covid-19",
            UvciFormat => "uvci-format",
            UvciCountry => "uvci-country",
            CountryNotIssuer => "country-not-issuer",
            TypeMismatch => "type-mismatch",
            TestResultNotNegative => "test-result-not-negative",
            RatDeviceRequired => "rat-device-required",
            SampleInFuture => "sample-in-future",
            SampleTooOld => "sample-too-old",
            DoseRange => "dose-range",
            DoseExceedsSeries => "dose-exceeds-series",
            DateInFuture => "date-in-future",
            RecoveryDateOrder => "recovery-date-order",
        }
    }

    /// Every rule, for documentation and tests.
    pub const ALL: [Rule; 28] = {
        use Rule::*;
        [
            Syntax,
            NotAnObject,
            Required,
            WrongType,
            UnknownField,
            ExactlyOneStatement,
            ExactlyOneEntry,
            TooLong,
            Version,
            StandardisedNameRequired,
            StandardisedNameFormat,
            DateOfBirthFormat,
            DateFormat,
            DateTimeFormat,
            ValueSet,
            DiseaseNotCovid19,
            UvciFormat,
            UvciCountry,
            CountryNotIssuer,
            TypeMismatch,
            TestResultNotNegative,
            RatDeviceRequired,
            SampleInFuture,
            SampleTooOld,
            DoseRange,
            DoseExceedsSeries,
            DateInFuture,
            RecoveryDateOrder,
        ]
    };
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
