//! Every stored fixture object (tests/fixtures/*.json: shapes from the reference, upstream docs
//! and the Go MIC) parses into its kind and serializes back to identical JSON.

use podid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .expect("fixtures dir")
        .map(|e| {
            let path = e.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read fixture");
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 12, "fixtures went missing: {}", out.len());
    out
}

fn round_trip<T: DeserializeOwned + Serialize>(name: &str, v: &Value) {
    let parsed: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let written = serde_json::to_value(&parsed).expect("serialize");
    assert_eq!(&written, v, "{name}: round trip changed the object");
}

#[test]
fn every_fixture_round_trips_unchanged() {
    for (name, v) in fixtures() {
        match v["kind"].as_str() {
            Some("AzureIdentity") => round_trip::<AzureIdentity>(&name, &v),
            Some("AzureIdentityBinding") => round_trip::<AzureIdentityBinding>(&name, &v),
            Some("AzureAssignedIdentity") => round_trip::<AzureAssignedIdentity>(&name, &v),
            Some("AzurePodIdentityException") => round_trip::<AzurePodIdentityException>(&name, &v),
            other => panic!("{name}: unexpected kind {other:?}"),
        }
    }
}
