//! One setting, declared once with [`section!`]: the field of [`Settings`]
//! it fills (also its key in the `--config` file), its default, its help (the
//! field's documentation), its environment variable (the flag is the same name
//! in lower case with dashes), whether it is secret, and the check its value
//! must pass. The command line, `--help` and the checks are derived from it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::PossibleValue;
use clap::ValueEnum;
use secrecy::{ExposeSecret, SecretString};

use super::{LogFormat, SaslMechanism, SecurityProtocol, Settings};

#[derive(Debug)]
pub struct Setting {
    pub env: &'static str,
    /// `section.field`: the field of [`Settings`] and the TOML key.
    pub key: &'static str,
    pub heading: &'static str,
    pub value_name: &'static str,
    /// The field's documentation, as written (lines start with a space).
    pub(super) doc: &'static str,
    pub secret: bool,
    /// What `--help` says when the default is unset.
    pub(super) unset: Option<&'static str>,
    /// The values allowed, if they are a fixed set (from the field's type).
    pub choices: fn(&Settings) -> Vec<PossibleValue>,
    pub(super) set: fn(&mut Settings, &str) -> Result<(), String>,
    pub(super) show: fn(&Settings) -> Option<String>,
    pub(super) check: fn(&Settings) -> Result<(), String>,
}

impl Setting {
    /// The fields a [`section!`] entry may leave out.
    pub(super) const NONE: Setting = Setting {
        env: "",
        key: "",
        heading: "",
        value_name: "",
        doc: "",
        secret: false,
        unset: None,
        choices: |_| Vec::new(),
        set: |_, _| Ok(()),
        show: |_| None,
        check: |_| Ok(()),
    };

    pub fn flag(&self) -> String {
        self.env.to_lowercase().replace('_', "-")
    }

    /// The help line, ending with the default taken from `defaults`.
    pub fn help(&self, defaults: &Settings) -> String {
        let help = self.doc.trim();
        match ((self.show)(defaults), self.unset) {
            (Some(default), _) => format!("{help} [default: {default}]"),
            (None, Some(unset)) => format!("{help} [default: {unset}]"),
            (None, None) => help.to_owned(),
        }
    }

    /// The value `settings` holds, as a flag would give it; `None` when unset.
    pub fn shown(&self, settings: &Settings) -> Option<String> {
        (self.show)(settings)
    }

    /// Sets the value from a flag or environment variable.
    pub fn apply(&self, settings: &mut Settings, value: &str) -> anyhow::Result<()> {
        (self.set)(settings, value).map_err(|e| {
            if self.secret {
                anyhow::anyhow!("{}: invalid value ({e})", self.env)
            } else {
                anyhow::anyhow!("{}: invalid value '{value}' ({e})", self.env)
            }
        })
    }

    pub(super) fn check(&self, settings: &Settings) -> anyhow::Result<()> {
        (self.check)(settings).map_err(|e| anyhow::anyhow!("{}: {e}", self.env))
    }
}

/// Declares a section of [`Settings`]: its struct, each field's default and
/// documentation, and each field's [`Setting`] in `SETTINGS`. An entry reads
///
/// ```text
/// /// Help shown by --help.
/// field: Type = default => ENV_NAME "VALUE-NAME" [if check] [, secret = true] [, unset = Some("...")];
/// ```
///
/// The form `impl Type in section` declares only the settings of a struct
/// declared elsewhere, with its own defaults.
macro_rules! section {
    (
        $(#[doc = $struct_doc:literal])*
        pub struct $name:ident in $section:ident, heading $heading:literal {$(
            $(#[doc = $doc:literal])+
            $(#[serde($($serde:tt)*)])?
            $field:ident: $ty:ty = $default:expr
                => $env:ident $value_name:literal $(if $check:path)? $(, $opt:ident = $val:expr)*;
        )*}
    ) => {
        $(#[doc = $struct_doc])*
        #[derive(Debug, Clone, serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {$(
            $(#[doc = $doc])+
            $(#[serde($($serde)*)])?
            pub $field: $ty,
        )*}

        impl Default for $name {
            fn default() -> Self {
                Self { $($field: $default,)* }
            }
        }

        $crate::configuration::setting::section! {
            impl $name in $section, heading $heading {$(
                $(#[doc = $doc])+
                $field => $env $value_name $(if $check)? $(, $opt = $val)*;
            )*}
        }
    };
    (
        impl $name:ident in $section:ident, heading $heading:literal {$(
            $(#[doc = $doc:literal])+
            $field:ident => $env:ident $value_name:literal $(if $check:path)? $(, $opt:ident = $val:expr)*;
        )*}
    ) => {
        impl $name {
            /// This section's settings, in the order `--help` shows them.
            pub const SETTINGS: &'static [$crate::configuration::Setting] = &[$(
                $crate::configuration::Setting {
                    env: stringify!($env),
                    key: concat!(stringify!($section), ".", stringify!($field)),
                    heading: $heading,
                    value_name: $value_name,
                    doc: concat!($($doc),+),
                    set: |s, v| {
                        s.$section.$field = $crate::configuration::setting::FlagValue::read(v)?;
                        Ok(())
                    },
                    show: |s| $crate::configuration::setting::FlagValue::show(&s.$section.$field),
                    choices: |s| $crate::configuration::setting::choices_of(&s.$section.$field),
                    $(check: |s| $check(&s.$section.$field),)?
                    $($opt: $val,)*
                    ..$crate::configuration::Setting::NONE
                },
            )*];
        }
    };
}
pub(crate) use section;

/// How a setting's type reads a flag or environment value and shows itself.
pub trait FlagValue: Sized {
    fn read(value: &str) -> Result<Self, String>;
    fn show(&self) -> Option<String>;
    /// The values allowed, if they are a fixed set.
    fn choices() -> Vec<PossibleValue> {
        Vec::new()
    }
}

pub fn choices_of<T: FlagValue>(_: &T) -> Vec<PossibleValue> {
    T::choices()
}

macro_rules! flag_value_from_str {
    ($($t:ty),*) => {$(
        impl FlagValue for $t {
            fn read(value: &str) -> Result<Self, String> {
                value.parse().map_err(|e| format!("{e}"))
            }
            fn show(&self) -> Option<String> {
                Some(self.to_string())
            }
        }
    )*};
}
flag_value_from_str!(u32, u64, usize, String, SocketAddr);

impl FlagValue for SecretString {
    fn read(value: &str) -> Result<Self, String> {
        Ok(value.into())
    }
    /// Only ever called on the built-in defaults, which hold no password.
    fn show(&self) -> Option<String> {
        Some(self.expose_secret().to_owned())
    }
}

/// An optional name: given, even empty, it is set.
impl FlagValue for Option<String> {
    fn read(value: &str) -> Result<Self, String> {
        Ok(Some(value.to_owned()))
    }
    fn show(&self) -> Option<String> {
        self.clone()
    }
}

/// An optional URL or file: empty means unset, like an absent one.
macro_rules! flag_value_unless_empty {
    ($($t:ty),*) => {$(
        impl FlagValue for Option<$t> {
            fn read(value: &str) -> Result<Self, String> {
                Ok((!value.is_empty()).then(|| value.into()))
            }
            fn show(&self) -> Option<String> {
                None
            }
        }
    )*};
}
flag_value_unless_empty!(SecretString, PathBuf);

impl FlagValue for bool {
    fn read(value: &str) -> Result<Self, String> {
        value
            .to_ascii_lowercase()
            .parse()
            .map_err(|e| format!("{e}"))
    }
    fn show(&self) -> Option<String> {
        Some(self.to_string())
    }
    fn choices() -> Vec<PossibleValue> {
        vec![PossibleValue::new("true"), PossibleValue::new("false")]
    }
}

/// A value of a fixed set, by its name in any case.
macro_rules! flag_value_enum {
    ($($t:ty),*) => {$(
        impl FlagValue for $t {
            fn read(value: &str) -> Result<Self, String> {
                <Self as ValueEnum>::from_str(value, true)
            }
            fn show(&self) -> Option<String> {
                self.to_possible_value().map(|v| v.get_name().to_owned())
            }
            fn choices() -> Vec<PossibleValue> {
                Self::value_variants()
                    .iter()
                    .filter_map(ValueEnum::to_possible_value)
                    .collect()
            }
        }
    )*};
}
flag_value_enum!(LogFormat, SecurityProtocol, SaslMechanism);

/// A count, a size or a time that must not be zero.
pub fn positive<T: PartialOrd + Default>(value: &T) -> Result<(), String> {
    if *value > T::default() {
        Ok(())
    } else {
        Err("must be greater than 0".into())
    }
}

/// A name that must not be empty or blank.
pub fn named(value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(())
    }
}
