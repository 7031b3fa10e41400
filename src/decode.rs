//! Decode and validate: raw bytes (JSON, or Avro as a plain datum or in the Confluent wire format)
//! become a checked [`Transaction`], or a [`DecodeError`] that says which field is wrong and why.
//!
//! Field names are those of the bundled dataset (`IP Address`, also accepted as `IPAddress`).
//! Ranges are those of the original API: amount 0–1,000,000; age 18–120; duration 0–10,000 s;
//! login attempts 0–10; balance 0–10,000,000.

use std::fmt;
use std::io::Cursor;
use std::sync::Arc;

use apache_avro::Schema;
use chrono::{DateTime, NaiveDateTime, Utc};
use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::config::Encoding;
use crate::registry::{Lookup, SchemaRegistry};

/// The Avro schema of an input event, as shipped in `schemas/transaction.avsc`.
pub const TRANSACTION_AVSC: &str = include_str!("../schemas/transaction.avsc");

/// An event as it arrives, every field optional so that a missing one is reported by name. Its
/// text lives inline up to 24 bytes (every id, address and name of a usual event): decoding
/// one allocates nothing.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawTransaction {
    #[serde(rename = "TransactionID")]
    pub transaction_id: Option<CompactString>,
    #[serde(rename = "AccountID")]
    pub account_id: Option<CompactString>,
    #[serde(rename = "TransactionAmount")]
    pub amount: Option<f64>,
    #[serde(rename = "TransactionDate")]
    pub date: Option<CompactString>,
    #[serde(rename = "TransactionType")]
    pub transaction_type: Option<CompactString>,
    #[serde(rename = "Location")]
    pub location: Option<CompactString>,
    #[serde(rename = "DeviceID")]
    pub device_id: Option<CompactString>,
    #[serde(rename = "IP Address", alias = "IPAddress")]
    pub ip_address: Option<CompactString>,
    #[serde(rename = "MerchantID")]
    pub merchant_id: Option<CompactString>,
    #[serde(rename = "Channel")]
    pub channel: Option<CompactString>,
    #[serde(rename = "CustomerAge")]
    pub customer_age: Option<i64>,
    #[serde(rename = "CustomerOccupation")]
    pub occupation: Option<CompactString>,
    #[serde(rename = "TransactionDuration")]
    pub duration: Option<i64>,
    #[serde(rename = "LoginAttempts")]
    pub login_attempts: Option<i64>,
    #[serde(rename = "AccountBalance")]
    pub balance: Option<f64>,
    #[serde(rename = "PreviousTransactionDate")]
    pub previous_date: Option<CompactString>,
}

/// Debit or credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransactionType {
    Debit,
    Credit,
}

/// Where the transaction was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channel {
    #[serde(rename = "ATM")]
    Atm,
    Online,
    Branch,
}

/// The customer's occupation as the core system records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Occupation {
    Doctor,
    Student,
    Retired,
    Engineer,
}

macro_rules! enum_names {
    ($ty:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            pub const NAMES: &'static [&'static str] = &[$($name),+];
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),+ }
            }
            fn parse(s: &str) -> Option<Self> {
                match s { $($name => Some(Self::$variant),)+ _ => None }
            }
        }
    };
}
enum_names!(TransactionType { Debit => "Debit", Credit => "Credit" });
enum_names!(Channel { Atm => "ATM", Online => "Online", Branch => "Branch" });
enum_names!(Occupation { Doctor => "Doctor", Student => "Student", Retired => "Retired", Engineer => "Engineer" });

/// A validated transaction: every field present and inside its range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transaction {
    #[serde(rename = "TransactionID")]
    pub transaction_id: CompactString,
    #[serde(rename = "AccountID")]
    pub account_id: CompactString,
    #[serde(rename = "TransactionAmount")]
    pub amount: f64,
    /// Event time, seconds since the Unix epoch (UTC).
    #[serde(rename = "TransactionDate", serialize_with = "serialize_time")]
    pub time: i64,
    #[serde(rename = "TransactionType")]
    pub transaction_type: TransactionType,
    #[serde(rename = "Location")]
    pub location: CompactString,
    #[serde(rename = "DeviceID")]
    pub device_id: CompactString,
    #[serde(rename = "IP Address")]
    pub ip_address: CompactString,
    #[serde(rename = "MerchantID")]
    pub merchant_id: CompactString,
    #[serde(rename = "Channel")]
    pub channel: Channel,
    #[serde(rename = "CustomerAge")]
    pub customer_age: u32,
    #[serde(rename = "CustomerOccupation")]
    pub occupation: Occupation,
    #[serde(rename = "TransactionDuration")]
    pub duration: u32,
    #[serde(rename = "LoginAttempts")]
    pub login_attempts: u32,
    #[serde(rename = "AccountBalance")]
    pub balance: f64,
    #[serde(
        rename = "PreviousTransactionDate",
        skip_serializing_if = "Option::is_none"
    )]
    pub previous_date: Option<CompactString>,
}

/// Formats epoch seconds as the dataset's `YYYY-MM-DD HH:MM:SS`.
pub fn format_time(secs: i64) -> String {
    DateTime::<Utc>::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| secs.to_string())
}

fn serialize_time<S: serde::Serializer>(secs: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*secs))
}

/// Why an event was rejected. `code()` is the metric label; `Display` is the dead-letter reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid {format}: {detail}")]
    Malformed {
        format: &'static str,
        detail: String,
    },
    #[error("field `{field}` is missing")]
    Missing { field: &'static str },
    #[error("field `{field}` is empty")]
    Empty { field: &'static str },
    #[error("field `{field}` = {value} is outside {min}..={max}")]
    OutOfRange {
        field: &'static str,
        value: String,
        min: f64,
        max: f64,
    },
    #[error("field `{field}` = `{value}` is not one of {allowed}")]
    NotAllowed {
        field: &'static str,
        value: String,
        allowed: String,
    },
    #[error("field `{field}` = `{value}` is not a timestamp (YYYY-MM-DD HH:MM:SS or RFC 3339)")]
    BadTimestamp { field: &'static str, value: String },
    #[error("field `{field}` = `{value}` is implausible: {why}")]
    ImplausibleTime {
        field: &'static str,
        value: String,
        why: String,
    },
    /// The Confluent wire format named a schema id that cannot be used (not registered, not
    /// Avro, or not readable as `dev.vigil.Transaction`).
    #[error("written with Avro schema id {id}, which {why}")]
    UnusableSchema { id: u32, why: String },
    /// The registry did not answer for a schema id not seen before. The stream fetches each new
    /// id before decoding and waits out an outage, so only the offline tools can see this.
    #[error("written with Avro schema id {id}, and the registry did not answer: {detail}")]
    RegistryUnavailable { id: u32, detail: String },
}

impl DecodeError {
    /// Every value `code()` returns.
    pub const CODES: [&'static str; 9] = [
        "malformed",
        "missing_field",
        "empty_field",
        "out_of_range",
        "not_allowed",
        "bad_timestamp",
        "implausible_time",
        "unusable_schema",
        "registry_unavailable",
    ];

    /// Short, stable label for metrics and the dead-letter `error.code` header.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed",
            Self::Missing { .. } => "missing_field",
            Self::Empty { .. } => "empty_field",
            Self::OutOfRange { .. } => "out_of_range",
            Self::NotAllowed { .. } => "not_allowed",
            Self::BadTimestamp { .. } => "bad_timestamp",
            Self::ImplausibleTime { .. } => "implausible_time",
            Self::UnusableSchema { .. } => "unusable_schema",
            Self::RegistryUnavailable { .. } => "registry_unavailable",
        }
    }

    /// The field at fault, if the error is about one field.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Malformed { .. }
            | Self::UnusableSchema { .. }
            | Self::RegistryUnavailable { .. } => None,
            Self::Missing { field }
            | Self::Empty { field }
            | Self::OutOfRange { field, .. }
            | Self::NotAllowed { field, .. }
            | Self::BadTimestamp { field, .. }
            | Self::ImplausibleTime { field, .. } => Some(field),
        }
    }

    /// Which stage rejected the event, for the dead-letter `error.stage` header.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::Malformed { .. }
            | Self::UnusableSchema { .. }
            | Self::RegistryUnavailable { .. } => "decode",
            _ => "validate",
        }
    }
}

/// Decodes event bytes in one encoding; the Avro schema is parsed once, here.
#[derive(Debug, Clone)]
pub enum Decoder {
    Json,
    /// Every datum read with `schemas/transaction.avsc`, Confluent framing skipped.
    Avro(Box<Schema>),
    /// A datum in the Confluent wire format is read with the writer schema its id names in the
    /// registry and resolved to `schemas/transaction.avsc`, so evolved schemas decode by field
    /// name; a plain datum is read as [`Decoder::Avro`] does.
    Registered {
        reader: Box<Schema>,
        registry: Arc<SchemaRegistry>,
    },
}

impl Decoder {
    pub fn new(encoding: Encoding) -> Self {
        match encoding {
            Encoding::Json => Self::Json,
            Encoding::Avro => Self::Avro(Box::new(transaction_schema())),
        }
    }

    /// As [`Decoder::new`], reading Avro through `registry` when there is one.
    pub fn with_registry(encoding: Encoding, registry: Option<Arc<SchemaRegistry>>) -> Self {
        match (encoding, registry) {
            (Encoding::Avro, Some(registry)) => Self::Registered {
                reader: Box::new(transaction_schema()),
                registry,
            },
            (encoding, _) => Self::new(encoding),
        }
    }

    /// The registry and schema id of a Confluent-framed datum whose writer schema has not been
    /// fetched yet: the stream fetches it off the runtime's threads before decoding.
    pub fn schema_to_fetch(&self, bytes: &[u8]) -> Option<(&Arc<SchemaRegistry>, u32)> {
        let Self::Registered { registry, .. } = self else {
            return None;
        };
        let (id, _) = confluent_frame(bytes)?;
        registry.cached(id).is_none().then_some((registry, id))
    }

    /// Bytes to a checked transaction.
    pub fn decode(&self, bytes: &[u8]) -> Result<Transaction, DecodeError> {
        let raw = match self {
            Self::Json => serde_json::from_slice::<RawTransaction>(bytes).map_err(|e| {
                DecodeError::Malformed {
                    format: "JSON",
                    detail: e.to_string(),
                }
            })?,
            Self::Avro(schema) => decode_avro(schema, bytes)?,
            Self::Registered { reader, registry } => decode_registered(reader, registry, bytes)?,
        };
        validate(raw)
    }

    /// Best-effort `(transaction id, account id)` of an event that failed decoding or
    /// validation, so that its log line and dead letter can be found by either id.
    pub fn identify(&self, bytes: &[u8]) -> (Option<String>, Option<String>) {
        #[derive(Deserialize)]
        struct Ids {
            #[serde(rename = "TransactionID")]
            transaction_id: Option<String>,
            #[serde(rename = "AccountID")]
            account_id: Option<String>,
        }
        match self {
            Self::Json => serde_json::from_slice::<Ids>(bytes)
                .map(|i| (i.transaction_id, i.account_id))
                .unwrap_or_default(),
            Self::Avro(schema) => decode_avro(schema, bytes)
                .map(|r| {
                    (
                        r.transaction_id.map(String::from),
                        r.account_id.map(String::from),
                    )
                })
                .unwrap_or_default(),
            Self::Registered { reader, registry } => decode_registered(reader, registry, bytes)
                .map(|r| {
                    (
                        r.transaction_id.map(String::from),
                        r.account_id.map(String::from),
                    )
                })
                .unwrap_or_default(),
        }
    }
}

/// The parsed transaction schema. The shipped schema is checked by a unit test, so parsing it
/// cannot fail at run time.
pub fn transaction_schema() -> Schema {
    Schema::parse_str(TRANSACTION_AVSC).unwrap_or_else(|e| unreachable!("shipped schema: {e}"))
}

/// Confluent framing: magic byte 0 then a big-endian schema id. A plain datum never starts with
/// 0 for a valid event, since that would be an empty TransactionID.
const CONFLUENT_MAGIC: u8 = 0;
const CONFLUENT_HEADER: usize = 5;

/// The schema id and datum of a Confluent-framed record.
pub fn confluent_frame(bytes: &[u8]) -> Option<(u32, &[u8])> {
    match bytes {
        [CONFLUENT_MAGIC, a, b, c, d, datum @ ..] if !datum.is_empty() => {
            Some((u32::from_be_bytes([*a, *b, *c, *d]), datum))
        }
        _ => None,
    }
}

/// Prefixes an Avro datum with the Confluent framing for schema `id`.
pub fn confluent_framed(id: u32, datum: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(CONFLUENT_HEADER + datum.len());
    framed.push(CONFLUENT_MAGIC);
    framed.extend_from_slice(&id.to_be_bytes());
    framed.extend_from_slice(datum);
    framed
}

fn malformed(detail: String) -> DecodeError {
    DecodeError::Malformed {
        format: "Avro",
        detail,
    }
}

fn decode_avro(schema: &Schema, bytes: &[u8]) -> Result<RawTransaction, DecodeError> {
    let datum = confluent_frame(bytes).map_or(bytes, |(_, datum)| datum);
    raw_from_avro(read_exact(schema, datum)?).map_err(malformed)
}

fn decode_registered(
    reader: &Schema,
    registry: &SchemaRegistry,
    bytes: &[u8],
) -> Result<RawTransaction, DecodeError> {
    let Some((id, datum)) = confluent_frame(bytes) else {
        return decode_avro(reader, bytes);
    };
    let writer = match registry.writer_schema(id) {
        Ok(Lookup::Found(writer)) => writer,
        Ok(Lookup::Unusable(why)) => return Err(DecodeError::UnusableSchema { id, why }),
        Err(e) => {
            return Err(DecodeError::RegistryUnavailable {
                id,
                detail: e.to_string(),
            });
        }
    };
    let value = read_exact(&writer, datum)?;
    let value = value
        .resolve(reader)
        .map_err(|e| DecodeError::UnusableSchema {
            id,
            why: format!("cannot be read as dev.vigil.Transaction: {e}"),
        })?;
    raw_from_avro(value).map_err(malformed)
}

/// Reads one datum of `schema` that must take exactly these bytes.
fn read_exact(schema: &Schema, datum: &[u8]) -> Result<apache_avro::types::Value, DecodeError> {
    let mut reader = Cursor::new(datum);
    let value = apache_avro::from_avro_datum(schema, &mut reader, None)
        .map_err(|e| malformed(e.to_string()))?;
    if (reader.position() as usize) != datum.len() {
        return Err(malformed(format!(
            "{} trailing bytes after the record",
            datum.len() - reader.position() as usize
        )));
    }
    // apache-avro reads a string whose bytes run out as null, so a cut datum can decode to a
    // record with a field silently lost. The record must encode back to exactly these bytes
    // (a value's binary encoding is unique for a schema without arrays or maps, and for those
    // written in one block, as every common writer does).
    let again =
        apache_avro::to_avro_datum(schema, value.clone()).map_err(|e| malformed(e.to_string()))?;
    if again != datum {
        return Err(malformed(format!(
            "the datum does not match its schema (cut short or written with another schema: \
             {} bytes, a record of this schema with these values takes {})",
            datum.len(),
            again.len()
        )));
    }
    Ok(value)
}

/// Maps a decoded record onto the raw event (the schema guarantees the field types).
fn raw_from_avro(value: apache_avro::types::Value) -> Result<RawTransaction, String> {
    use apache_avro::types::Value;
    let Value::Record(fields) = value else {
        return Err("not a record".into());
    };
    let mut raw = RawTransaction::default();
    for (name, v) in fields {
        let v = match v {
            Value::Union(_, inner) => *inner,
            v => v,
        };
        let (s, f, i) = match v {
            Value::String(s) => (Some(CompactString::from(s)), None, None),
            Value::Double(x) => (None, Some(x), None),
            Value::Int(x) => (None, None, Some(i64::from(x))),
            Value::Null => continue,
            other => return Err(format!("field `{name}` has unexpected value {other:?}")),
        };
        match name.as_str() {
            "TransactionID" => raw.transaction_id = s,
            "AccountID" => raw.account_id = s,
            "TransactionAmount" => raw.amount = f,
            "TransactionDate" => raw.date = s,
            "TransactionType" => raw.transaction_type = s,
            "Location" => raw.location = s,
            "DeviceID" => raw.device_id = s,
            "IPAddress" => raw.ip_address = s,
            "MerchantID" => raw.merchant_id = s,
            "Channel" => raw.channel = s,
            "CustomerAge" => raw.customer_age = i,
            "CustomerOccupation" => raw.occupation = s,
            "TransactionDuration" => raw.duration = i,
            "LoginAttempts" => raw.login_attempts = i,
            "AccountBalance" => raw.balance = f,
            "PreviousTransactionDate" => raw.previous_date = s,
            _ => {}
        }
    }
    Ok(raw)
}

/// Encodes a transaction as an Avro datum of `schemas/transaction.avsc` (plain, no framing).
pub fn encode_avro(schema: &Schema, tx: &Transaction) -> Result<Vec<u8>, apache_avro::Error> {
    apache_avro::to_avro_datum(schema, transaction_avro_value(tx))
}

/// A transaction as an Avro record value of `schemas/transaction.avsc`.
pub fn transaction_avro_value(tx: &Transaction) -> apache_avro::types::Value {
    use apache_avro::types::Value;
    let s = |v: &str| Value::String(v.to_string());
    Value::Record(vec![
        ("TransactionID".into(), s(&tx.transaction_id)),
        ("AccountID".into(), s(&tx.account_id)),
        ("TransactionAmount".into(), Value::Double(tx.amount)),
        ("TransactionDate".into(), s(&format_time(tx.time))),
        ("TransactionType".into(), s(tx.transaction_type.as_str())),
        ("Location".into(), s(&tx.location)),
        ("DeviceID".into(), s(&tx.device_id)),
        ("IPAddress".into(), s(&tx.ip_address)),
        ("MerchantID".into(), s(&tx.merchant_id)),
        ("Channel".into(), s(tx.channel.as_str())),
        ("CustomerAge".into(), Value::Int(tx.customer_age as i32)),
        ("CustomerOccupation".into(), s(tx.occupation.as_str())),
        ("TransactionDuration".into(), Value::Int(tx.duration as i32)),
        ("LoginAttempts".into(), Value::Int(tx.login_attempts as i32)),
        ("AccountBalance".into(), Value::Double(tx.balance)),
        (
            "PreviousTransactionDate".into(),
            Value::Union(
                u32::from(tx.previous_date.is_some()),
                Box::new(tx.previous_date.as_deref().map(s).unwrap_or(Value::Null)),
            ),
        ),
    ])
}

/// Parses the dataset's `YYYY-MM-DD HH:MM:SS` (UTC), `YYYY-MM-DDTHH:MM:SS`, or RFC 3339.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Some(t) = parse_dataset_time(s) {
        return Some(t);
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S%.f",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp());
        }
    }
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp())
}

/// The dataset's exact `YYYY-MM-DD HH:MM:SS` (or with `T`) without a format interpreter: every
/// event carries one, and chrono's `parse_from_str` reads its format string each call. Anything
/// else (or an impossible date) is left to the general parser.
fn parse_dataset_time(s: &str) -> Option<i64> {
    let b: &[u8; 19] = s.as_bytes().try_into().ok()?;
    let number = |range: std::ops::Range<usize>| {
        b[range].iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b' ' | b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(number(0..4)?).ok()?,
        number(5..7)?,
        number(8..10)?,
    )?;
    let time = date.and_hms_opt(number(11..13)?, number(14..16)?, number(17..19)?)?;
    Some(time.and_utc().timestamp())
}

fn required<T>(v: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::Missing { field })
}

fn text(v: Option<CompactString>, field: &'static str) -> Result<CompactString, DecodeError> {
    let v = required(v, field)?;
    if v.trim().is_empty() {
        Err(DecodeError::Empty { field })
    } else {
        Ok(v)
    }
}

fn ranged<T: Copy + Into<f64> + fmt::Display>(
    v: Option<T>,
    field: &'static str,
    min: f64,
    max: f64,
) -> Result<T, DecodeError> {
    let v = required(v, field)?;
    let x: f64 = v.into();
    if x.is_finite() && x >= min && x <= max {
        Ok(v)
    } else {
        Err(DecodeError::OutOfRange {
            field,
            value: v.to_string(),
            min,
            max,
        })
    }
}

fn int_ranged(v: Option<i64>, field: &'static str, min: i64, max: i64) -> Result<u32, DecodeError> {
    let v = required(v, field)?;
    if (min..=max).contains(&v) {
        Ok(v as u32)
    } else {
        Err(DecodeError::OutOfRange {
            field,
            value: v.to_string(),
            min: min as f64,
            max: max as f64,
        })
    }
}

fn one_of<T>(
    v: Option<CompactString>,
    field: &'static str,
    parse: fn(&str) -> Option<T>,
    names: &[&str],
) -> Result<T, DecodeError> {
    let v = text(v, field)?;
    parse(&v).ok_or_else(|| DecodeError::NotAllowed {
        field,
        value: v.into(),
        allowed: names.join(", "),
    })
}

/// Checks every field of a raw event, in schema order, and reports the first problem.
pub fn validate(raw: RawTransaction) -> Result<Transaction, DecodeError> {
    let transaction_id = text(raw.transaction_id, "TransactionID")?;
    let account_id = text(raw.account_id, "AccountID")?;
    let amount = ranged(raw.amount, "TransactionAmount", 0.0, 1_000_000.0)?;
    let date = text(raw.date, "TransactionDate")?;
    let time = parse_time(&date).ok_or_else(|| DecodeError::BadTimestamp {
        field: "TransactionDate",
        value: date.into(),
    })?;
    let transaction_type = one_of(
        raw.transaction_type,
        "TransactionType",
        TransactionType::parse,
        TransactionType::NAMES,
    )?;
    let location = text(raw.location, "Location")?;
    let device_id = text(raw.device_id, "DeviceID")?;
    let ip_address = text(raw.ip_address, "IP Address")?;
    let merchant_id = text(raw.merchant_id, "MerchantID")?;
    let channel = one_of(raw.channel, "Channel", Channel::parse, Channel::NAMES)?;
    let customer_age = int_ranged(raw.customer_age, "CustomerAge", 18, 120)?;
    let occupation = one_of(
        raw.occupation,
        "CustomerOccupation",
        Occupation::parse,
        Occupation::NAMES,
    )?;
    let duration = int_ranged(raw.duration, "TransactionDuration", 0, 10_000)?;
    let login_attempts = int_ranged(raw.login_attempts, "LoginAttempts", 0, 10)?;
    let balance = ranged(raw.balance, "AccountBalance", 0.0, 10_000_000.0)?;
    Ok(Transaction {
        transaction_id,
        account_id,
        amount,
        time,
        transaction_type,
        location,
        device_id,
        ip_address,
        merchant_id,
        channel,
        customer_age,
        occupation,
        duration,
        login_attempts,
        balance,
        previous_date: raw.previous_date,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"TransactionID":"TX000001","AccountID":"AC00128","TransactionAmount":14.09,
        "TransactionDate":"2023-04-11 16:29:14","TransactionType":"Debit","Location":"San Diego",
        "DeviceID":"D000380","IP Address":"162.198.218.92","MerchantID":"M015","Channel":"ATM",
        "CustomerAge":70,"CustomerOccupation":"Doctor","TransactionDuration":81,"LoginAttempts":1,
        "AccountBalance":5112.21,"PreviousTransactionDate":"2024-11-04 08:08:08"}"#;

    fn with(field: &str, value: serde_json::Value) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            if value.is_null() {
                map.remove(field);
            } else {
                map.insert(field.to_string(), value);
            }
        }
        serde_json::to_vec(&v).unwrap_or_default()
    }

    fn reject(bytes: &[u8]) -> DecodeError {
        match Decoder::Json.decode(bytes) {
            Ok(tx) => panic!("accepted {tx:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_dataset_row_decodes_with_all_fields() {
        let tx = Decoder::Json
            .decode(GOOD.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tx.account_id, "AC00128");
        assert_eq!(tx.amount, 14.09);
        assert_eq!(format_time(tx.time), "2023-04-11 16:29:14");
        assert_eq!(tx.channel, Channel::Atm);
        assert_eq!(tx.ip_address, "162.198.218.92");
    }

    #[test]
    fn ip_address_is_accepted_without_the_space() {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap_or_default();
        let map = v.as_object_mut().unwrap_or_else(|| unreachable!());
        let ip = map.remove("IP Address").unwrap_or_default();
        map.insert("IPAddress".into(), ip);
        let tx = Decoder::Json
            .decode(&serde_json::to_vec(&v).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tx.ip_address, "162.198.218.92");
    }

    #[test]
    fn every_error_code_is_listed_in_codes() {
        let errors = [
            DecodeError::Malformed {
                format: "JSON",
                detail: String::new(),
            },
            DecodeError::Missing { field: "x" },
            DecodeError::Empty { field: "x" },
            DecodeError::OutOfRange {
                field: "x",
                value: String::new(),
                min: 0.0,
                max: 1.0,
            },
            DecodeError::NotAllowed {
                field: "x",
                value: String::new(),
                allowed: String::new(),
            },
            DecodeError::BadTimestamp {
                field: "x",
                value: String::new(),
            },
            DecodeError::ImplausibleTime {
                field: "x",
                value: String::new(),
                why: String::new(),
            },
            DecodeError::UnusableSchema {
                id: 1,
                why: String::new(),
            },
            DecodeError::RegistryUnavailable {
                id: 1,
                detail: String::new(),
            },
        ];
        let codes: Vec<_> = errors.iter().map(DecodeError::code).collect();
        assert_eq!(codes, DecodeError::CODES);
    }

    #[test]
    fn an_invalid_event_is_still_identified_by_its_ids_when_they_parse() {
        let bad = with("TransactionAmount", serde_json::json!("lots"));
        assert_eq!(
            Decoder::Json.identify(&bad),
            (Some("TX000001".into()), Some("AC00128".into()))
        );
        assert_eq!(
            Decoder::Json.identify(b"{\"TransactionID\": "),
            (None, None)
        );
    }

    #[test]
    fn broken_json_is_malformed() {
        let e = reject(b"{\"TransactionID\": ");
        assert_eq!(e.code(), "malformed");
        assert_eq!(e.stage(), "decode");
    }

    #[test]
    fn every_missing_field_is_named() {
        for field in [
            "TransactionID",
            "AccountID",
            "TransactionAmount",
            "TransactionDate",
            "TransactionType",
            "Location",
            "DeviceID",
            "IP Address",
            "MerchantID",
            "Channel",
            "CustomerAge",
            "CustomerOccupation",
            "TransactionDuration",
            "LoginAttempts",
            "AccountBalance",
        ] {
            let e = reject(&with(field, serde_json::Value::Null));
            assert_eq!(e, DecodeError::Missing { field }, "{field}");
            assert_eq!(e.stage(), "validate");
        }
    }

    #[test]
    fn empty_identifiers_are_rejected() {
        let e = reject(&with("AccountID", " ".into()));
        assert_eq!(e, DecodeError::Empty { field: "AccountID" });
    }

    #[test]
    fn every_range_rule_rejects_just_outside_and_accepts_the_edges() {
        for (field, low, high, bad_low, bad_high) in [
            ("TransactionAmount", 0.0, 1_000_000.0, -0.01, 1_000_000.01),
            ("CustomerAge", 18.0, 120.0, 17.0, 121.0),
            ("TransactionDuration", 0.0, 10_000.0, -1.0, 10_001.0),
            ("LoginAttempts", 0.0, 10.0, -1.0, 11.0),
            ("AccountBalance", 0.0, 10_000_000.0, -0.01, 10_000_000.01),
        ] {
            let integer = !matches!(field, "TransactionAmount" | "AccountBalance");
            let num = |x: f64| -> serde_json::Value {
                if integer { (x as i64).into() } else { x.into() }
            };
            for ok in [low, high] {
                assert!(
                    Decoder::Json.decode(&with(field, num(ok))).is_ok(),
                    "{field}={ok}"
                );
            }
            for bad in [bad_low, bad_high] {
                let e = reject(&with(field, num(bad)));
                assert_eq!(e.code(), "out_of_range", "{field}={bad}: {e}");
                assert_eq!(e.field(), Some(field));
            }
        }
    }

    #[test]
    fn a_fractional_age_is_malformed_not_truncated() {
        assert_eq!(
            reject(&with("CustomerAge", 30.5.into())).code(),
            "malformed"
        );
    }

    #[test]
    fn enum_fields_accept_only_their_values() {
        for (field, bad) in [
            ("TransactionType", "Refund"),
            ("Channel", "Phone"),
            ("CustomerOccupation", "Pilot"),
        ] {
            let e = reject(&with(field, bad.into()));
            assert_eq!(e.code(), "not_allowed", "{field}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn timestamps_must_parse() {
        let e = reject(&with("TransactionDate", "yesterday".into()));
        assert_eq!(e.code(), "bad_timestamp");
        for ok in ["2023-04-11T16:29:14", "2023-04-11T18:29:14+02:00"] {
            let tx = Decoder::Json
                .decode(&with("TransactionDate", ok.into()))
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(format_time(tx.time), "2023-04-11 16:29:14");
        }
    }

    #[test]
    fn the_dataset_time_shortcut_agrees_with_chrono_and_leaves_the_rest_to_it() {
        let chrono_reads = |s: &str| {
            ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
                .map(|t| t.and_utc().timestamp())
        };
        for s in [
            "2023-04-11 16:29:14",
            "2023-04-11T16:29:14",
            "1970-01-01 00:00:00",
            "2024-02-29 23:59:59",
            "2023-02-29 10:00:00",
            "2023-13-01 10:00:00",
            "2023-04-11 24:00:00",
            "2023-04-11 23:59:60",
            "2023-04-11 16:29:1x",
            "2023/04/11 16:29:14",
            "+023-04-11 16:29:14",
        ] {
            if let Some(t) = parse_dataset_time(s) {
                assert_eq!(Some(t), chrono_reads(s), "{s}");
            }
            assert_eq!(parse_time(s), chrono_reads(s), "{s}");
        }
        assert!(parse_dataset_time("2024-02-29 23:59:59").is_some());
        // A leap second is chrono's to read.
        assert!(parse_dataset_time("2023-04-11 23:59:60").is_none());
        // Forms the shortcut does not take still parse.
        assert_eq!(
            parse_time("2023-04-11 16:29:14.250"),
            parse_time("2023-04-11 16:29:14")
        );
        assert!(parse_dataset_time("2023-04-11 16:29:14.250").is_none());
    }

    #[test]
    fn avro_plain_and_confluent_framed_decode_to_the_same_transaction() {
        let tx = Decoder::Json
            .decode(GOOD.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let decoder = Decoder::new(Encoding::Avro);
        let Decoder::Avro(schema) = &decoder else {
            unreachable!()
        };
        let plain = encode_avro(schema, &tx).unwrap_or_else(|e| panic!("{e}"));
        let mut framed = vec![0, 0, 0, 0, 42];
        framed.extend_from_slice(&plain);
        assert_eq!(decoder.decode(&plain).as_ref(), Ok(&tx));
        assert_eq!(decoder.decode(&framed).as_ref(), Ok(&tx));
    }

    #[test]
    fn truncated_or_padded_avro_is_malformed() {
        let tx = Decoder::Json
            .decode(GOOD.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let decoder = Decoder::new(Encoding::Avro);
        let Decoder::Avro(schema) = &decoder else {
            unreachable!()
        };
        let plain = encode_avro(schema, &tx).unwrap_or_else(|e| panic!("{e}"));
        for cut in 0..plain.len() {
            let e = decoder.decode(&plain[..cut]).err();
            assert_eq!(
                e.map(|e| e.code()),
                Some("malformed"),
                "a datum cut to {cut} of {} bytes",
                plain.len()
            );
        }
        let mut padded = plain.clone();
        padded.push(7);
        assert_eq!(
            decoder.decode(&padded).err().map(|e| e.code()),
            Some("malformed")
        );
    }

    /// The shipped transaction schema with one more field (first, in the middle — a double
    /// right before `TransactionDuration`, whose bytes would pass for it — or last), and the
    /// event of `GOOD` written with each.
    fn evolved_datums() -> Vec<(String, Schema, Vec<u8>)> {
        use apache_avro::types::Value;
        let tx = Decoder::Json
            .decode(GOOD.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let base: serde_json::Value =
            serde_json::from_str(TRANSACTION_AVSC).unwrap_or_else(|e| panic!("{e}"));
        let Value::Record(values) = transaction_avro_value(&tx) else {
            unreachable!()
        };
        let n = values.len();
        let duration = values
            .iter()
            .position(|(k, _)| k == "TransactionDuration")
            .unwrap_or_else(|| unreachable!());
        let double = serde_json::json!({"name": "Extra", "type": "double", "default": 0.0});
        let string = serde_json::json!({"name": "Extra", "type": "string", "default": ""});
        let long = serde_json::json!({"name": "Extra", "type": "long", "default": 0});
        let tags = serde_json::json!({"name": "Extra", "type": {"type": "array", "items": "string"}, "default": []});
        let mut out = Vec::new();
        for (at, extra, value) in [
            (duration, double.clone(), Value::Double(0.0)),
            (0, double, Value::Double(1234.5)),
            (n / 2, string, Value::String("added later".into())),
            (n, long, Value::Long(77)),
            (
                n,
                tags,
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
        ] {
            let mut evolved = base.clone();
            let fields = evolved["fields"]
                .as_array_mut()
                .unwrap_or_else(|| unreachable!());
            fields.insert(at, extra.clone());
            let schema = Schema::parse_str(&evolved.to_string()).unwrap_or_else(|e| panic!("{e}"));
            let mut record = values.clone();
            record.insert(at, ("Extra".into(), value));
            let bytes = apache_avro::to_avro_datum(&schema, Value::Record(record))
                .unwrap_or_else(|e| panic!("{e}"));
            out.push((format!("a {extra} field at {at}"), schema, bytes));
        }
        out
    }

    /// Without a schema registry vigil reads every datum with its own schema; a datum written
    /// with a schema that has one more field must be refused, not read with its bytes shifted
    /// into the wrong fields.
    #[test]
    fn without_a_registry_a_datum_of_an_evolved_schema_is_malformed_never_misread() {
        let decoder = Decoder::new(Encoding::Avro);
        for (what, _, datum) in evolved_datums() {
            for bytes in [datum.clone(), confluent_framed(1, &datum)] {
                let got = decoder.decode(&bytes);
                assert_eq!(
                    got.as_ref().err().map(DecodeError::code),
                    Some("malformed"),
                    "{what} was read as {got:?}"
                );
            }
        }
    }

    fn registry_knowing(ids: Vec<(u32, Lookup)>) -> Arc<SchemaRegistry> {
        let registry = SchemaRegistry::new(&crate::registry::RegistryConfig {
            url: "http://127.0.0.1:9".into(),
            username: None,
            password: None,
            ca_location: None,
            timeout: std::time::Duration::from_secs(1),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        for (id, lookup) in ids {
            registry.remember(id, lookup);
        }
        Arc::new(registry)
    }

    /// With a registry each framed datum is read with the schema its id names and resolved by
    /// field name, so it becomes exactly the event the base schema gives.
    #[test]
    fn with_a_registry_a_datum_of_an_evolved_schema_decodes_to_the_same_event() {
        let want = Decoder::Json
            .decode(GOOD.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let evolved = evolved_datums();
        let known = evolved
            .iter()
            .enumerate()
            .map(|(i, (_, schema, _))| (i as u32 + 10, Lookup::Found(Arc::new(schema.clone()))))
            .collect();
        let decoder = Decoder::with_registry(Encoding::Avro, Some(registry_knowing(known)));
        for (i, (what, _, datum)) in evolved.iter().enumerate() {
            let framed = confluent_framed(i as u32 + 10, datum);
            assert!(decoder.schema_to_fetch(&framed).is_none(), "{what}: cached");
            let got = decoder.decode(&framed);
            assert_eq!(got.as_ref().ok(), Some(&want), "{what}: {got:?}");
            for cut in 1..datum.len() {
                let code = decoder.decode(&framed[..framed.len() - cut]).err();
                assert_eq!(
                    code.as_ref().map(DecodeError::code),
                    Some("malformed"),
                    "{what} cut by {cut} bytes: {code:?}"
                );
            }
        }
    }

    #[test]
    fn an_unknown_or_unreadable_schema_id_is_a_dead_letter_that_names_it() {
        let Decoder::Avro(base) = Decoder::new(Encoding::Avro) else {
            unreachable!()
        };
        let tx = Decoder::Json
            .decode(GOOD.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let datum = encode_avro(&base, &tx).unwrap_or_else(|e| panic!("{e}"));
        let without_amount = Schema::parse_str(
            r#"{"type":"record","name":"Transaction","namespace":"dev.vigil","fields":[
                {"name":"TransactionID","type":"string"}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let id_only = apache_avro::to_avro_datum(
            &without_amount,
            apache_avro::types::Value::Record(vec![(
                "TransactionID".into(),
                apache_avro::types::Value::String("TX1".into()),
            )]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let registry = registry_knowing(vec![
            (1, Lookup::Found(Arc::new(*base.clone()))),
            (
                2,
                Lookup::Unusable("is not registered in the schema registry".into()),
            ),
            (3, Lookup::Found(Arc::new(without_amount))),
        ]);
        let decoder = Decoder::with_registry(Encoding::Avro, Some(registry));
        assert_eq!(decoder.decode(&confluent_framed(1, &datum)).ok(), Some(tx));
        let unknown = decoder.decode(&confluent_framed(2, &datum)).err();
        assert_eq!(
            unknown.as_ref().map(DecodeError::code),
            Some("unusable_schema")
        );
        assert!(
            unknown.as_ref().is_some_and(|e| e
                .to_string()
                .contains("schema id 2, which is not registered")),
            "{unknown:?}"
        );
        let unreadable = decoder.decode(&confluent_framed(3, &id_only)).err();
        assert_eq!(
            unreadable.as_ref().map(DecodeError::code),
            Some("unusable_schema")
        );
        assert!(
            unreadable.as_ref().is_some_and(|e| e
                .to_string()
                .contains("cannot be read as dev.vigil.Transaction")),
            "{unreadable:?}"
        );
        let (registry, id) = decoder
            .schema_to_fetch(&confluent_framed(4, &datum))
            .unwrap_or_else(|| panic!("id 4 is not cached"));
        assert_eq!((registry.url(), id), ("http://127.0.0.1:9", 4));
    }

    #[test]
    fn avro_values_are_validated_like_json() {
        let mut tx = Decoder::Json
            .decode(GOOD.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        tx.login_attempts = 50;
        let decoder = Decoder::new(Encoding::Avro);
        let Decoder::Avro(schema) = &decoder else {
            unreachable!()
        };
        let bytes = encode_avro(schema, &tx).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            decoder.decode(&bytes).err().map(|e| e.code()),
            Some("out_of_range")
        );
    }
}
