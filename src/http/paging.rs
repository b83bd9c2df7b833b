//! Query parameters of the list endpoints: known names only, and cursor paging
//! (`limit`, and `before`, the `next_cursor` of the previous page).

use std::collections::HashMap;

use serde_json::json;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::Required;
use utoipa::IntoParams;

use super::error::ApiError;

const MAX_PAGE: i64 = 100;
const DEFAULT_PAGE: i64 = 20;

pub struct Page {
    pub limit: i64,
    pub before: Option<i64>,
}

impl Page {
    /// The page asked for, once every parameter is one of `filters`, `limit` or `before`.
    pub fn from_params(
        params: &HashMap<String, String>,
        filters: &[&str],
    ) -> Result<Self, ApiError> {
        let known = |k: &str| k == "limit" || k == "before" || filters.contains(&k);
        if let Some(unknown) = params.keys().find(|k| !known(k)) {
            let mut names = filters.to_vec();
            names.extend(["limit", "before"]);
            return Err(bad(format!(
                "unknown parameter {unknown:?}; use {}",
                names.join(", ")
            )));
        }
        let limit = match params.get("limit") {
            None => DEFAULT_PAGE,
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_PAGE).contains(n))
                .ok_or_else(|| bad(format!("limit must be a whole number from 1 to {MAX_PAGE}")))?,
        };
        let before = match params.get("before") {
            None => None,
            Some(v) => Some(v.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                bad("before must be a next_cursor value from an earlier page".into())
            })?),
        };
        Ok(Self { limit, before })
    }

    /// The cursor of the page after one that returned `rows` rows ending at
    /// `last`: none when the page was not full.
    pub fn next_cursor(&self, rows: usize, last: Option<i64>) -> Option<String> {
        (rows as i64 == self.limit)
            .then(|| last.map(|id| id.to_string()))
            .flatten()
    }
}

/// `limit` and `before` in the API's document.
impl IntoParams for Page {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let limit = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(MAX_PAGE))
            .default(Some(json!(DEFAULT_PAGE)));
        let before = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[0-9]+$"));
        let query = |name: &str, description: &str| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(description))
        };
        vec![
            query("limit", "How many to return, at most")
                .schema(Some(limit))
                .build(),
            query("before", "The next_cursor of the previous page")
                .schema(Some(before))
                .build(),
        ]
    }
}

pub fn bad(reason: String) -> ApiError {
    ApiError::BadRequest {
        reason,
        order_uid: None,
    }
}
