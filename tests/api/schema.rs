//! The OpenAPI document is checked against what the service serves: every
//! JSON body a route answers with matches the schema the document gives for
//! that route and status, and has no field the document does not declare.

use serde_json::{json, Value};

use crate::helpers::{sample_with_uid, TestEnv};

/// What `value` breaks of `schema` (resolved in `doc`), each with its JSON
/// path. `strict`: a field the schema does not declare is reported.
fn mismatches(doc: &Value, schema: &Value, value: &Value, at: &str, strict: bool) -> Vec<String> {
    let schema = resolve(doc, schema);
    let mut found = Vec::new();
    if let Some(parts) = schema["allOf"].as_array() {
        // Each part checks its own fields; undeclared are those no part declares.
        for part in parts {
            found.extend(mismatches(doc, part, value, at, false));
        }
        if let (true, Value::Object(fields)) = (strict, value) {
            for key in fields.keys() {
                if !parts
                    .iter()
                    .any(|p| resolve(doc, p)["properties"].get(key).is_some())
                {
                    found.push(format!("{at}.{key}: not in the document"));
                }
            }
        }
        return found;
    }
    // One of several shapes (an optional reference is `null` or the reference).
    if let Some(choices) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
        let fits = |choice| mismatches(doc, choice, value, at, strict).is_empty();
        if !choices.iter().any(fits) {
            found.push(format!("{at}: {value} fits none of {choices:?}"));
        }
        return found;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            found.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() && !types.iter().any(|t| is_of_type(value, t)) {
        found.push(format!("{at}: {value} is not {types:?}"));
        return found;
    }
    match value {
        Value::Object(fields) => {
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap_or_default();
                if !fields.contains_key(name) {
                    found.push(format!("{at}.{name}: required, missing"));
                }
            }
            for (key, field) in fields {
                match schema["properties"].get(key) {
                    Some(sub) => {
                        found.extend(mismatches(doc, sub, field, &format!("{at}.{key}"), true));
                    }
                    None if strict => found.push(format!("{at}.{key}: not in the document")),
                    None => {}
                }
            }
        }
        Value::Array(items) if schema.get("items").is_some() => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("{at}[{i}]");
                found.extend(mismatches(doc, &schema["items"], item, &at, true));
            }
        }
        _ => {}
    }
    found
}

/// `schema`, or what its `$ref` points at in `doc`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => doc
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("unresolved $ref {reference}")),
        None => schema,
    }
}

fn is_of_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

/// The JSON schema the document gives for `path`'s GET answering `status`.
fn documented<'a>(doc: &'a Value, path: &str, status: u16) -> &'a Value {
    let schema = &doc["paths"][path]["get"]["responses"][status.to_string()]["content"]
        ["application/json"]["schema"];
    assert!(!schema.is_null(), "GET {path} {status}: no JSON schema");
    schema
}

/// Every JSON body of every route, found and not, matches its documented
/// schema and declares no field the document leaves out.
#[tokio::test]
async fn every_json_body_matches_the_openapi_document() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let mut bad = sample_with_uid("schema-bad");
    bad["payment"]["amount"] = json!(-1);
    let (bad, valid) = (bad.to_string(), sample_with_uid("schema-ok").to_string());
    env.produce(&[
        (Some("schema-ok"), valid.as_bytes()),
        (Some("schema-bad"), bad.as_bytes()),
    ])
    .await;
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters",
        1,
        std::time::Duration::from_secs(30),
    )
    .await;
    service
        .wait_for_order("schema-ok", std::time::Duration::from_secs(30))
        .await;
    let doc: Value = service.get("/openapi.json").await.json().await.unwrap();

    let letters: Value = service.get("/api/dead-letters").await.json().await.unwrap();
    let source = &letters["dead_letters"][0]["source"];
    let letter = format!(
        "/api/dead-letters/{}/{}/{}",
        source["topic"].as_str().unwrap(),
        source["partition"],
        source["offset"]
    );
    let cases = [
        ("/order/{order_uid}", "/order/schema-ok", 200),
        ("/order/{order_uid}", "/order/schema-bad", 404),
        ("/order/{order_uid}", "/order/not%20an%20id", 400),
        ("/api/orders", "/api/orders", 200),
        ("/api/orders", "/api/orders?customer_id=test", 200),
        ("/api/orders", "/api/orders?limit=0", 400),
        ("/api/dead-letters", "/api/dead-letters", 200),
        ("/api/dead-letters", "/api/dead-letters?stage=nope", 400),
        (
            "/api/dead-letters/{topic}/{partition}/{offset}",
            letter.as_str(),
            200,
        ),
        (
            "/api/dead-letters/{topic}/{partition}/{offset}",
            "/api/dead-letters/orders/0/999999",
            404,
        ),
        ("/readyz", "/readyz", 200),
    ];
    for (path, url, status) in cases {
        let response = service.get(url).await;
        assert_eq!(response.status().as_u16(), status, "{url}");
        let body: Value = response.json().await.unwrap();
        let found = mismatches(&doc, documented(&doc, path, status), &body, "$", true);
        assert!(
            found.is_empty(),
            "GET {url} ({status}): {found:#?}\n{body:#}"
        );
    }
}
