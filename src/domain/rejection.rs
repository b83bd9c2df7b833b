use std::borrow::Cow;
use std::fmt;

use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// Where in the decision a message was turned away. The names are the values of
/// the `stage` dead-letter header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Larger than the configured limit; not even read.
    TooLarge,
    /// Not a JSON object: empty, not UTF-8, not JSON, truncated, or another JSON type.
    Parse,
    /// A JSON object that breaks one or more rules of the order model.
    Validate,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::TooLarge => "too_large",
            Stage::Parse => "parse",
            Stage::Validate => "validate",
        }
    }
}

/// Every stage a dead letter can name: the decision's three, then `conflict`
/// (the id is stored with other content) and `store` (PostgreSQL refused it).
pub const LETTER_STAGES: [&str; 5] = ["too_large", "parse", "validate", "conflict", "store"];

/// A dead letter's stage in the API's document: one of [`LETTER_STAGES`].
pub struct StageName;

impl PartialSchema for StageName {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(LETTER_STAGES))
            .description(Some("Where in the decision the message was turned away"))
            .into()
    }
}

impl ToSchema for StageName {
    fn name() -> Cow<'static, str> {
        "Stage".into()
    }
}

/// One broken rule: the JSON path of the field (empty for the whole message) and
/// a short reason a person understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Why a message is not an order: every problem found, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Rejection {
    stage: Stage,
    problems: Vec<Problem>,
}

impl Rejection {
    pub(super) fn new(stage: Stage, problems: Vec<Problem>) -> Self {
        debug_assert!(!problems.is_empty());
        Self { stage, problems }
    }

    pub(super) fn single(stage: Stage, reason: impl Into<String>) -> Self {
        Self::new(
            stage,
            vec![Problem {
                path: String::new(),
                reason: reason.into(),
            }],
        )
    }

    /// A message of `bytes` bytes, over the limit of `limit`.
    pub fn too_large(bytes: u64, limit: usize) -> Self {
        Self::single(
            Stage::TooLarge,
            format!("message is {bytes} bytes, the limit is {limit}"),
        )
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Each problem as one line of text, in the order found.
    pub fn reasons(&self) -> Vec<String> {
        self.problems.iter().map(ToString::to_string).collect()
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}
