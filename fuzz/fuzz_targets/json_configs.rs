//! Every JSON the engine accepts from users: training configs, the simulators' settings and
//! a model file's metadata entry. Parsing and validation must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(c) = lumos::engine::train::TrainConfig::from_json(s) {
        let _ = c.validate();
    }
    if let Ok(c) = serde_json::from_str::<lumos::sim::ssqpm::SsqpmConfig>(s) {
        let _ = c.validate();
    }
    if let Ok(c) = serde_json::from_str::<lumos::sim::qpi::QpiConfig>(s) {
        let _ = c.validate();
    }
    if let Ok(c) = serde_json::from_str::<lumos::sim::fluo::FluoConfig>(s) {
        let _ = c.validate();
    }
    let md = std::collections::HashMap::from([("lumos".to_string(), s.to_string())]);
    let _ = lumos::engine::model::ModelMeta::from_metadata(std::path::Path::new("fuzz.lumos"), &md);
});
