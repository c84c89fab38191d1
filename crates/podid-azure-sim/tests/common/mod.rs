//! Helpers shared by the simulator's integration tests.
#![allow(dead_code)]

use serde_json::Value;

pub fn client() -> reqwest::Client {
    podid_azure_sim::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("client")
}

/// POSTs a form, returns status and JSON body.
pub async fn post_form(url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let r = client().post(url).form(form).send().await.expect("send");
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("json body");
    (status, body)
}

/// The first AADSTS code of an Entra error body.
pub fn aadsts(body: &Value) -> u64 {
    body["error_codes"][0].as_u64().expect("error_codes")
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}
