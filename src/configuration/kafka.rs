//! How the service reaches its brokers: where they are, the topics and group,
//! and the connection's security (TLS, SASL), shared by every Kafka client it
//! makes (consumer, producers, readers).

use std::net::SocketAddr;
use std::path::PathBuf;

use rdkafka::ClientConfig;
use secrecy::{ExposeSecret, SecretString};

use super::case_blind;
use super::setting::{named, section};

section! {
    pub struct KafkaSettings in kafka, heading "Kafka" {
        /// Kafka bootstrap servers, comma-separated host:port
        brokers: String = "127.0.0.1:9092".into() => KAFKA_BROKERS "LIST" if named;
        /// Topic the orders arrive on
        topic: String = "orders".into() => KAFKA_TOPIC "TOPIC" if named;
        /// Topic rejected messages go to, with the reasons in headers
        dlq_topic: String = "orders.dlq".into() => KAFKA_DLQ_TOPIC "TOPIC" if named;
        /// Consumer group; instances in one group share the partitions
        group_id: String = "order-service".into() => KAFKA_GROUP_ID "GROUP" if named;
        /// Stable member name of this instance in the group (static
        /// membership), e.g. the pod name; a restarted instance takes its
        /// partitions straight back. Empty: dynamic membership
        group_instance_id: Option<String> = None => KAFKA_GROUP_INSTANCE_ID "NAME",
            unset = Some("{host}-{ip}-{port} of the HTTP address");
        /// How long the group waits for a silent member before moving its
        /// partitions, in ms
        session_timeout_ms: u64 = 45_000 => KAFKA_SESSION_TIMEOUT_MS "MS" if session_timeout;
        /// How connections to the brokers are made: TLS (ssl), SASL sign-in
        /// (sasl_plaintext), or both (sasl_ssl)
        #[serde(deserialize_with = "case_blind")]
        security_protocol: SecurityProtocol = SecurityProtocol::Plaintext
            => KAFKA_SECURITY_PROTOCOL "PROTOCOL";
        /// How the SASL user name and password sign in
        #[serde(deserialize_with = "case_blind")]
        sasl_mechanism: SaslMechanism = SaslMechanism::Plain => KAFKA_SASL_MECHANISM "MECHANISM";
        /// SASL user name, with sasl_plaintext or sasl_ssl
        sasl_username: Option<String> = None => KAFKA_SASL_USERNAME "USER";
        /// SASL password, with sasl_plaintext or sasl_ssl
        sasl_password: Option<SecretString> = None => KAFKA_SASL_PASSWORD "PASSWORD", secret = true;
        /// PEM file of the authorities the brokers' certificates are checked
        /// against, with ssl or sasl_ssl
        ssl_ca_location: Option<PathBuf> = None => KAFKA_SSL_CA_LOCATION "FILE",
            unset = Some("the system's");
        /// PEM file of this client's certificate, for brokers that ask for one
        /// (with KAFKA_SSL_KEY_LOCATION)
        ssl_certificate_location: Option<PathBuf> = None => KAFKA_SSL_CERTIFICATE_LOCATION "FILE";
        /// PEM file of this client's private key
        ssl_key_location: Option<PathBuf> = None => KAFKA_SSL_KEY_LOCATION "FILE";
        /// Passphrase of the private key, if it is encrypted
        ssl_key_password: Option<SecretString> = None => KAFKA_SSL_KEY_PASSWORD "PASSWORD",
            secret = true;
    }
}

/// Kafka's brokers accept 6 s to 30 min by default; heartbeats go every 2 s.
fn session_timeout(ms: &u64) -> Result<(), String> {
    if (6_000..=1_800_000).contains(ms) {
        Ok(())
    } else {
        Err("must be between 6000 and 1800000".into())
    }
}

/// How connections to the brokers are made, by Kafka's names for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

impl std::fmt::Display for SecurityProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&name(*self))
    }
}

/// The SASL mechanisms a user name and password sign in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    #[value(name = "PLAIN")]
    Plain,
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

/// The name librdkafka and Kafka's documentation use for an enum's value.
fn name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

impl KafkaSettings {
    /// A client of the brokers: their addresses and the connection's
    /// security. Every Kafka client of the service starts from this.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("security.protocol", self.security_protocol.to_string());
        if self.security_protocol.uses_sasl() {
            config.set("sasl.mechanism", name(self.sasl_mechanism));
            if let Some(user) = &self.sasl_username {
                config.set("sasl.username", user);
            }
            if let Some(password) = &self.sasl_password {
                config.set("sasl.password", password.expose_secret());
            }
        }
        if self.security_protocol.uses_tls() {
            for (key, path) in [
                ("ssl.ca.location", &self.ssl_ca_location),
                ("ssl.certificate.location", &self.ssl_certificate_location),
                ("ssl.key.location", &self.ssl_key_location),
            ] {
                if let Some(path) = path {
                    config.set(key, path.to_string_lossy());
                }
            }
            if let Some(password) = &self.ssl_key_password {
                config.set("ssl.key.password", password.expose_secret());
            }
        }
        config
    }

    /// The checks of the connection's security: what a protocol needs is
    /// given, what it would ignore is not (a forgotten protocol would
    /// otherwise send credentials nowhere and fail as a refused connection),
    /// and the files named can be read.
    pub fn check_security(&self) -> anyhow::Result<()> {
        let protocol = self.security_protocol;
        if self.security_protocol.uses_sasl() {
            anyhow::ensure!(
                self.sasl_username.as_deref().is_some_and(|u| !u.is_empty())
                    && self.sasl_password.is_some(),
                "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD: both are needed with \
                 KAFKA_SECURITY_PROTOCOL={protocol}"
            );
        } else {
            for (setting, given) in [
                ("KAFKA_SASL_USERNAME", self.sasl_username.is_some()),
                ("KAFKA_SASL_PASSWORD", self.sasl_password.is_some()),
            ] {
                anyhow::ensure!(
                    !given,
                    "{setting}: set, but KAFKA_SECURITY_PROTOCOL is {protocol}, which signs in \
                     with none (sasl_plaintext or sasl_ssl do)"
                );
            }
        }
        let files = [
            ("KAFKA_SSL_CA_LOCATION", &self.ssl_ca_location),
            (
                "KAFKA_SSL_CERTIFICATE_LOCATION",
                &self.ssl_certificate_location,
            ),
            ("KAFKA_SSL_KEY_LOCATION", &self.ssl_key_location),
        ];
        for (setting, path) in files {
            let Some(path) = path else { continue };
            anyhow::ensure!(
                self.security_protocol.uses_tls(),
                "{setting}: set, but KAFKA_SECURITY_PROTOCOL is {protocol}, which uses no TLS \
                 (ssl or sasl_ssl do)"
            );
            std::fs::File::open(path)
                .map_err(|e| anyhow::anyhow!("{setting}: cannot read {} ({e})", path.display()))?;
        }
        anyhow::ensure!(
            self.ssl_certificate_location.is_some() == self.ssl_key_location.is_some(),
            "KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION: give both or neither"
        );
        anyhow::ensure!(
            self.ssl_key_password.is_none() || self.ssl_key_location.is_some(),
            "KAFKA_SSL_KEY_PASSWORD: set, but KAFKA_SSL_KEY_LOCATION names no key"
        );
        Ok(())
    }

    /// The static member name this instance joins its group with, if any.
    /// By default `{host}-{ip}-{port}` of the bound HTTP address: an instance
    /// restarted the same way takes its partitions straight back, and two
    /// instances on one host never share a name (they cannot share an
    /// address). An empty setting asks for dynamic membership.
    pub fn member_name(&self, http: SocketAddr) -> Option<String> {
        match self.group_instance_id.as_deref() {
            Some("") => None,
            Some(name) => Some(name.to_owned()),
            None => {
                let host = whoami::fallible::hostname().unwrap_or_else(|_| "localhost".into());
                let name = format!("{host}-{}-{}", http.ip(), http.port());
                // Kafka takes [A-Za-z0-9._-] in member names.
                Some(
                    name.chars()
                        .map(|c| match c {
                            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
                            _ => '-',
                        })
                        .collect(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(config: &ClientConfig, key: &str) -> Option<String> {
        config.get(key).map(str::to_owned)
    }

    #[test]
    fn plaintext_by_default_and_nothing_else() {
        let kafka = KafkaSettings::default();
        kafka.check_security().unwrap();
        let config = kafka.client_config();
        assert_eq!(
            get(&config, "security.protocol").as_deref(),
            Some("plaintext")
        );
        assert_eq!(get(&config, "sasl.mechanism"), None);
        assert_eq!(get(&config, "ssl.ca.location"), None);
    }

    #[test]
    fn sasl_over_tls_carries_its_credentials_and_files() {
        let ca = tempfile::NamedTempFile::new().unwrap();
        let kafka = KafkaSettings {
            security_protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: SaslMechanism::ScramSha512,
            sasl_username: Some("svc".into()),
            sasl_password: Some("hunter2".into()),
            ssl_ca_location: Some(ca.path().to_owned()),
            ..KafkaSettings::default()
        };
        kafka.check_security().unwrap();
        let config = kafka.client_config();
        assert_eq!(
            get(&config, "security.protocol").as_deref(),
            Some("sasl_ssl")
        );
        assert_eq!(
            get(&config, "sasl.mechanism").as_deref(),
            Some("SCRAM-SHA-512")
        );
        assert_eq!(get(&config, "sasl.username").as_deref(), Some("svc"));
        assert_eq!(get(&config, "sasl.password").as_deref(), Some("hunter2"));
        let ca = ca.path().to_string_lossy().into_owned();
        assert_eq!(get(&config, "ssl.ca.location"), Some(ca));
    }

    #[test]
    fn settings_the_protocol_would_ignore_are_refused() {
        let kafka = KafkaSettings {
            sasl_username: Some("svc".into()),
            ..KafkaSettings::default()
        };
        let err = kafka.check_security().unwrap_err().to_string();
        assert!(err.starts_with("KAFKA_SASL_USERNAME: set, but"), "{err}");
        let kafka = KafkaSettings {
            security_protocol: SecurityProtocol::SaslPlaintext,
            ssl_ca_location: Some("/etc/hostname".into()),
            sasl_username: Some("svc".into()),
            sasl_password: Some("pw".into()),
            ..KafkaSettings::default()
        };
        let err = kafka.check_security().unwrap_err().to_string();
        assert!(err.starts_with("KAFKA_SSL_CA_LOCATION: set, but"), "{err}");
    }

    #[test]
    fn what_a_protocol_needs_is_asked_for() {
        let kafka = KafkaSettings {
            security_protocol: SecurityProtocol::SaslSsl,
            sasl_username: Some("svc".into()),
            ..KafkaSettings::default()
        };
        let err = kafka.check_security().unwrap_err().to_string();
        assert!(err.contains("both are needed"), "{err}");
        let kafka = KafkaSettings {
            security_protocol: SecurityProtocol::Ssl,
            ssl_ca_location: Some("/nonexistent/ca.pem".into()),
            ..KafkaSettings::default()
        };
        let err = kafka.check_security().unwrap_err().to_string();
        assert!(
            err.starts_with("KAFKA_SSL_CA_LOCATION: cannot read /nonexistent/ca.pem"),
            "{err}"
        );
        let kafka = KafkaSettings {
            security_protocol: SecurityProtocol::Ssl,
            ssl_certificate_location: Some("/etc/hostname".into()),
            ..KafkaSettings::default()
        };
        let err = kafka.check_security().unwrap_err().to_string();
        assert!(err.contains("give both or neither"), "{err}");
    }
}
