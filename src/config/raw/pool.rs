//! The pool keys (`balance`, `connect_retries`, `max_fails`, `fail_timeout`,
//! `resolve_interval`, `[health_check]`), written the same way in a `[[rule]]` and in a
//! `[[rule.route]]`, and declared once: [`RawPool`].
//!
//! serde's `flatten` would be the obvious way to share them, but it buffers the table, which
//! loses the position `toml::Spanned` needs and turns `deny_unknown_fields` off. So
//! [`WithPool`] does it by hand, once, for any table `K` derived with serde: it hands `K`'s
//! derived visitor a map from which the pool keys have been taken out, and refuses a key that
//! is neither `K`'s nor the pool's while that key is being read, so that the error points at
//! the key (as the derived code's would).

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use toml::Spanned;

use super::{DurationValue, RawHealthCheck};

/// The keys of one pool, every one optional.
#[derive(Debug, Default)]
pub struct RawPool {
    pub balance: Option<Spanned<String>>,
    pub connect_retries: Option<Spanned<i64>>,
    pub max_fails: Option<Spanned<i64>>,
    pub fail_timeout: Option<Spanned<DurationValue>>,
    pub resolve_interval: Option<Spanned<DurationValue>>,
    pub health_check: Option<RawHealthCheck>,
}

impl RawPool {
    /// Every pool key, in the order error messages list them.
    pub const KEYS: &'static [&'static str] = &[
        "balance",
        "connect_retries",
        "max_fails",
        "fail_timeout",
        "resolve_interval",
        "health_check",
    ];

    /// Reads the value of `key` from `map` if it is a pool key; `false` if it is not.
    fn take<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "balance" => self.balance = Some(map.next_value()?),
            "connect_retries" => self.connect_retries = Some(map.next_value()?),
            "max_fails" => self.max_fails = Some(map.next_value()?),
            "fail_timeout" => self.fail_timeout = Some(map.next_value()?),
            "resolve_interval" => self.resolve_interval = Some(map.next_value()?),
            "health_check" => self.health_check = Some(map.next_value()?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The pool keys that were written, each with where (for "is set but ..." errors; a
    /// `[health_check]` table has no position of its own, so it gets `table`'s).
    pub fn written(
        &self,
        table: std::ops::Range<usize>,
    ) -> Vec<(&'static str, std::ops::Range<usize>)> {
        [
            self.balance.as_ref().map(|k| ("balance", k.span())),
            self.connect_retries
                .as_ref()
                .map(|k| ("connect_retries", k.span())),
            self.max_fails.as_ref().map(|k| ("max_fails", k.span())),
            self.fail_timeout
                .as_ref()
                .map(|k| ("fail_timeout", k.span())),
            self.resolve_interval
                .as_ref()
                .map(|k| ("resolve_interval", k.span())),
            self.health_check.as_ref().map(|_| ("health_check", table)),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// A table made of its own keys `K` (a serde-derived struct that denies unknown keys) and the
/// keys of a pool.
#[derive(Debug)]
pub struct WithPool<K> {
    pub keys: K,
    pub pool: RawPool,
}

impl<'de, K: Deserialize<'de>> Deserialize<'de> for WithPool<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut pool = RawPool::default();
        let keys = K::deserialize(Split {
            inner: d,
            pool: &mut pool,
        })?;
        Ok(WithPool { keys, pool })
    }
}

/// The deserializer `K` is given: it learns `K`'s key names from `deserialize_struct`, then
/// lets `K`'s visitor read the table through [`SplitMap`].
struct Split<'p, D> {
    inner: D,
    pool: &'p mut RawPool,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Split<'_, D> {
    type Error = D::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_struct(
            name,
            fields,
            SplitVisitor {
                visitor,
                fields,
                pool: self.pool,
            },
        )
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom(
            "WithPool is only for tables derived as structs",
        ))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

struct SplitVisitor<'p, V> {
    visitor: V,
    fields: &'static [&'static str],
    pool: &'p mut RawPool,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for SplitVisitor<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(SplitMap {
            map,
            fields: self.fields,
            pool: self.pool,
        })
    }
}

/// The table as `K` sees it: the pool keys are read into the pool on the way.
struct SplitMap<'p, A> {
    map: A,
    fields: &'static [&'static str],
    pool: &'p mut RawPool,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SplitMap<'_, A> {
    type Error = A::Error;

    fn next_key_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        loop {
            let Some(key) = self.map.next_key_seed(KnownKey(self.fields))? else {
                return Ok(None);
            };
            if !self.pool.take(&key, &mut self.map)? {
                return seed.deserialize(key.into_deserializer()).map(Some);
            }
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// Reads a key, refusing one that is neither the table's nor the pool's while the key is
/// read (so the error carries the key's position), in the words serde's derived code uses.
struct KnownKey(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KnownKey {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for KnownKey {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
        if self.0.contains(&key) || RawPool::KEYS.contains(&key) {
            return Ok(key.to_string());
        }
        let expected: Vec<String> = self
            .0
            .iter()
            .chain(RawPool::KEYS)
            .map(|k| format!("`{k}`"))
            .collect();
        Err(E::custom(format_args!(
            "unknown field `{key}`, expected one of {}",
            expected.join(", ")
        )))
    }
}
