//! The EU DCC value sets (ehn-dcc-valuesets 2.12.0, Apache-2.0), shipped inside the binary and
//! parsed once.

use std::collections::HashSet;
use std::sync::OnceLock;

/// A value set shipped with dccsign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueSet {
    /// `tg`: disease or agent targeted.
    DiseaseAgentTargeted,
    /// `co`: country codes.
    Country,
    /// `vp`: vaccine or prophylaxis.
    VaccineProphylaxis,
    /// `mp`: vaccine medicinal product.
    VaccineProduct,
    /// `ma` of a vaccination: marketing authorisation holder.
    VaccineManufacturer,
    /// `tt`: test type.
    TestType,
    /// `tr`: test result.
    TestResult,
    /// `ma` of a test: rapid antigen test device.
    TestDevice,
}

fn parse(json: &str) -> HashSet<String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    v.get("valueSetValues")
        .and_then(|m| m.as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

macro_rules! set {
    ($file:literal) => {{
        static S: OnceLock<HashSet<String>> = OnceLock::new();
        S.get_or_init(|| parse(include_str!(concat!("valuesets/", $file))))
    }};
}

impl ValueSet {
    /// The codes of this set.
    pub fn codes(self) -> &'static HashSet<String> {
        match self {
            ValueSet::DiseaseAgentTargeted => set!("disease-agent-targeted.json"),
            ValueSet::Country => set!("country-2-codes.json"),
            ValueSet::VaccineProphylaxis => set!("vaccine-prophylaxis.json"),
            ValueSet::VaccineProduct => set!("vaccine-medicinal-product.json"),
            ValueSet::VaccineManufacturer => set!("vaccine-mah-manf.json"),
            ValueSet::TestType => set!("test-type.json"),
            ValueSet::TestResult => set!("test-result.json"),
            ValueSet::TestDevice => set!("test-manf-example.json"),
        }
    }

    /// Whether `code` is in the set.
    pub fn contains(self, code: &str) -> bool {
        self.codes().contains(code)
    }

    /// The set's name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ValueSet::DiseaseAgentTargeted => "disease-agent-targeted",
            ValueSet::Country => "country-2-codes",
            ValueSet::VaccineProphylaxis => "vaccine-prophylaxis",
            ValueSet::VaccineProduct => "vaccine-medicinal-product",
            ValueSet::VaccineManufacturer => "vaccine-mah-manf",
            ValueSet::TestType => "test-type",
            ValueSet::TestResult => "test-result",
            ValueSet::TestDevice => "test-manf",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_load() {
        assert!(ValueSet::DiseaseAgentTargeted.contains("840539006"));
        assert!(ValueSet::Country.contains("SE"));
        assert!(ValueSet::Country.codes().len() > 200);
        assert!(
            ValueSet::TestType.contains("LP6464-4") && ValueSet::TestType.contains("LP217198-3")
        );
        assert!(ValueSet::TestResult.contains("260415000"));
        assert!(ValueSet::TestDevice.contains("1232"));
        assert!(ValueSet::VaccineProduct.contains("EU/1/20/1528"));
        assert!(ValueSet::VaccineManufacturer.contains("ORG-100030215"));
        assert!(ValueSet::VaccineProphylaxis.contains("J07BX03"));
        assert!(!ValueSet::TestResult.contains("nope"));
    }
}
