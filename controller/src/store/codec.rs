//! Value encoding: one version byte, then postcard. A value written by a newer
//! build is refused with a clear error rather than misread.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;
use super::keys;

/// The version byte of values this build writes.
const VALUE_VERSION: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(value, vec![VALUE_VERSION]).map_err(|e| StoreError::Encode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: keys::display(key), reason };
    match bytes.split_first() {
        Some((&VALUE_VERSION, body)) => postcard::from_bytes(body).map_err(|e| corrupt(e.to_string())),
        Some((v, _)) => Err(corrupt(format!("value version {v}; this build reads {VALUE_VERSION}"))),
        None => Err(corrupt("empty value".into())),
    }
}
