//! docker-compose.yml read as data (no Docker here): the wiring people rely on
//! when they run `docker compose up`.

use yaml_rust2::{Yaml, YamlLoader};

fn compose() -> Yaml {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml");
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text)
        .expect("docker-compose.yml is YAML")
        .remove(0)
}

fn text(y: &Yaml) -> &str {
    y.as_str().unwrap_or_else(|| panic!("not a string: {y:?}"))
}

#[test]
fn kafka_keeps_its_data_in_its_volume() {
    let c = compose();
    let kafka = &c["services"]["kafka"];
    let dirs = text(&kafka["environment"]["KAFKA_LOG_DIRS"]);
    let mounts: Vec<&str> = kafka["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("kafka-data:") && m.ends_with(dirs)),
        "KAFKA_LOG_DIRS {dirs} is not the mounted volume {mounts:?}"
    );
}

#[test]
fn only_what_listens_is_health_checked() {
    let c = compose();
    for quiet in ["migrate", "producer"] {
        assert_eq!(
            c["services"][quiet]["healthcheck"]["disable"].as_bool(),
            Some(true),
            "{quiet} serves no HTTP but would inherit the image's /healthz check"
        );
    }
    let serve = &c["services"]["order-service"];
    let check = serve["healthcheck"]["test"].as_vec().unwrap();
    assert!(
        text(check.last().unwrap()).ends_with("/readyz"),
        "{check:?}"
    );
}

#[test]
fn postgres_is_ready_over_tcp_before_migrate_and_serve_after_it() {
    let c = compose();
    let s = &c["services"];
    let check = text(&s["postgres"]["healthcheck"]["test"][1]);
    assert!(check.contains("pg_isready -h "), "{check}");
    assert_eq!(
        text(&s["migrate"]["depends_on"]["postgres"]["condition"]),
        "service_healthy"
    );
    for (needs, condition) in [
        ("migrate", "service_completed_successfully"),
        ("kafka-topics", "service_completed_successfully"),
        ("redis", "service_healthy"),
    ] {
        assert_eq!(
            text(&s["order-service"]["depends_on"][needs]["condition"]),
            condition,
            "order-service waits for {needs}"
        );
    }
    assert_eq!(text(&s["migrate"]["command"][0]), "migrate");
    assert_eq!(text(&s["order-service"]["command"][0]), "serve");
    assert_eq!(text(&s["producer"]["command"][0]), "produce");
}

#[test]
fn every_instance_reads_the_same_settings() {
    let c = compose();
    let s = &c["services"];
    let env = &s["order-service"]["environment"];
    for key in [
        "DATABASE_URL",
        "MIGRATION_DATABASE_URL",
        "KAFKA_BROKERS",
        "KAFKA_TOPIC",
        "KAFKA_DLQ_TOPIC",
    ] {
        assert!(env[key].as_str().is_some(), "order-service lacks {key}");
        for other in ["migrate", "producer"] {
            assert_eq!(s[other]["environment"][key], env[key], "{other}: {key}");
        }
    }
    assert_eq!(text(&env["KAFKA_TOPIC"]), "orders");
    assert_eq!(text(&env["KAFKA_DLQ_TOPIC"]), "orders.dlq");
}
