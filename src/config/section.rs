//! Configuration sections that other crates own.
//!
//! The core parses `transport`, `[server]`, `[client]`, `[limits]` and `[pool]` itself. Every
//! other section (the transports' `[tcp]`, `[rdma]`) belongs to the crate that uses it: that
//! crate defines a type, lists its keys once in [`Section::KEYS`] (name, doc, how to render
//! the value, how to check and store one), and calls [`register`] (the transports do it from
//! their `register` function). From then on [`Config`](super::Config) parses the section,
//! refuses its unknown keys and bad values with errors that name them, prints it with every
//! key's doc, applies `--set section.key=value` to it, and hands it out typed through
//! [`Config::section`](super::Config::section). Adding a key is one entry in that crate's
//! `KEYS` plus its field.
//!
//! A section that nobody registered is an unknown section: a configuration file with
//! `[rdma]` needs a program that registered the RDMA transport (`zcio`, `libzcio` and the
//! fuzz targets do, whether or not RDMA support is compiled in).

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Mutex, OnceLock, RwLock};

/// A TOML value: what [`Key::get`] returns and [`Key::set`] takes.
pub use toml::Value;

use crate::error::{Error, Result};

/// A configuration section owned by another crate: `[NAME]` with the keys in `KEYS`.
///
/// `Default` gives every key's default; `KEYS` must cover every field the section reads, so
/// that what [`Config::to_toml`](super::Config::to_toml) prints parses back to the same
/// value.
pub trait Section: Clone + fmt::Debug + Default + PartialEq + Send + Sync + 'static {
    /// The table's name, `rdma` for `[rdma]`.
    const NAME: &'static str;
    /// Every key, in the order `zcio config` prints them.
    const KEYS: &'static [Key<Self>];
}

/// One key of a [`Section`].
pub struct Key<S> {
    /// The key's name within its section.
    pub name: &'static str,
    /// What it does, its unit and its range: printed as a comment by `zcio config`.
    pub doc: &'static str,
    /// The value as TOML (what `to_toml` prints; it must parse back through `set`).
    pub get: fn(&S) -> Value,
    /// Checks a value and stores it; `Err` says why it is refused (the caller names the
    /// key and the value). The helpers in [`value`] do the checking.
    pub set: fn(&mut S, &Value) -> std::result::Result<(), String>,
}

impl<S> fmt::Debug for Key<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("name", &self.name).finish()
    }
}

/// Value checks for [`Key::set`]: each returns the value or why it is refused.
pub mod value {
    use toml::Value;

    /// A boolean.
    pub fn bool(v: &Value) -> Result<bool, String> {
        v.as_bool().ok_or_else(|| "expected true or false".into())
    }

    /// An integer in `min ..= max`.
    pub fn int(v: &Value, min: i64, max: i64) -> Result<i64, String> {
        let n = v
            .as_integer()
            .ok_or_else(|| format!("expected an integer {min} ..= {max}"))?;
        if n < min || n > max {
            return Err(format!("must be {min} ..= {max}"));
        }
        Ok(n)
    }

    /// A size in bytes, at most `max`: an integer or a string such as `"64K"`, `"1M"`.
    pub fn size(v: &Value, max: usize) -> Result<usize, String> {
        let n = match v {
            Value::Integer(n) => {
                usize::try_from(*n).map_err(|_| "must not be negative".to_string())?
            }
            Value::String(s) => super::super::parse_size_value(s)?,
            _ => return Err("expected a size like 4096, 64K, 1M or 1GiB".into()),
        };
        if n > max {
            return Err(format!("must be at most {max}"));
        }
        Ok(n)
    }

    /// A string.
    pub fn string(v: &Value) -> Result<String, String> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| "expected a string".into())
    }
}

/// A section behind a pointer, whatever its type.
trait AnySection: fmt::Debug + Send + Sync {
    fn keys(&self) -> Vec<(&'static str, &'static str)>;
    fn get(&self, key: &str) -> Option<Value>;
    fn set(&mut self, key: &str, v: &Value) -> Option<std::result::Result<(), String>>;
    fn clone_box(&self) -> Box<dyn AnySection>;
    fn same(&self, other: &dyn AnySection) -> bool;
    fn is_default(&self) -> bool;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<S: Section> AnySection for S {
    fn keys(&self) -> Vec<(&'static str, &'static str)> {
        S::KEYS.iter().map(|k| (k.name, k.doc)).collect()
    }
    fn get(&self, key: &str) -> Option<Value> {
        S::KEYS
            .iter()
            .find(|k| k.name == key)
            .map(|k| (k.get)(self))
    }
    fn set(&mut self, key: &str, v: &Value) -> Option<std::result::Result<(), String>> {
        S::KEYS
            .iter()
            .find(|k| k.name == key)
            .map(|k| (k.set)(self, v))
    }
    fn clone_box(&self) -> Box<dyn AnySection> {
        Box::new(self.clone())
    }
    fn same(&self, other: &dyn AnySection) -> bool {
        other.as_any().downcast_ref::<S>() == Some(self)
    }
    fn is_default(&self) -> bool {
        *self == S::default()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A registered section: how to make its defaults.
struct Registered {
    name: &'static str,
    type_id: TypeId,
    make: fn() -> Box<dyn AnySection>,
}

fn registered() -> &'static RwLock<Vec<Registered>> {
    static SECTIONS: OnceLock<RwLock<Vec<Registered>>> = OnceLock::new();
    SECTIONS.get_or_init(Default::default)
}

/// Registers section `S` with the configuration of this process (again: nothing happens).
///
/// # Panics
/// If another type already registered the name `S::NAME`, or `S::NAME` is one of the core's
/// own sections: both are programming errors.
pub fn register<S: Section>() {
    let mut all = registered().write().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = all.iter().find(|r| r.name == S::NAME) {
        assert!(
            r.type_id == TypeId::of::<S>(),
            "config section [{}] registered by two types",
            S::NAME
        );
        return;
    }
    assert!(
        !super::CORE_SECTIONS.contains(&S::NAME),
        "[{}] is the core's own config section",
        S::NAME
    );
    all.push(Registered {
        name: S::NAME,
        type_id: TypeId::of::<S>(),
        make: || Box::new(S::default()),
    });
}

/// The names of the registered sections, in registration order.
pub fn registered_names() -> Vec<&'static str> {
    let all = registered().read().unwrap_or_else(|e| e.into_inner());
    all.iter().map(|r| r.name).collect()
}

/// The defaults of `S`, for a configuration built before `S` was registered.
fn default_of<S: Section>() -> &'static S {
    type Defaults = HashMap<TypeId, &'static (dyn Any + Send + Sync)>;
    static DEFAULTS: OnceLock<Mutex<Defaults>> = OnceLock::new();
    let mut d = DEFAULTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // One leaked value per section type, for the life of the process.
    let any: &'static (dyn Any + Send + Sync) = *d
        .entry(TypeId::of::<S>())
        .or_insert_with(|| Box::leak(Box::new(S::default())));
    any.downcast_ref::<S>()
        .expect("a default is stored under its own type")
}

/// The registered sections' values in one configuration.
#[derive(Debug)]
pub struct Sections(BTreeMap<&'static str, Box<dyn AnySection>>);

impl Sections {
    /// Every registered section at its defaults.
    pub(super) fn defaults() -> Sections {
        let all = registered().read().unwrap_or_else(|e| e.into_inner());
        Sections(all.iter().map(|r| (r.name, (r.make)())).collect())
    }

    /// Section `S` (its defaults when it was not registered when this configuration was
    /// made).
    pub(super) fn get<S: Section>(&self) -> &S {
        self.0
            .get(S::NAME)
            .and_then(|s| s.as_any().downcast_ref::<S>())
            .unwrap_or_else(|| default_of::<S>())
    }

    /// Section `S`, to change it (added at its defaults when missing).
    pub(super) fn get_mut<S: Section>(&mut self) -> &mut S {
        let entry = self
            .0
            .entry(S::NAME)
            .or_insert_with(|| Box::new(S::default()));
        if !entry.as_any().is::<S>() {
            *entry = Box::new(S::default());
        }
        entry
            .as_any_mut()
            .downcast_mut::<S>()
            .expect("just made of this type")
    }

    /// True when `name` is a registered section.
    pub(super) fn knows(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// Applies the TOML table given for section `name` (registered) key by key.
    pub(super) fn apply(&mut self, name: &str, table: &Value) -> Result<()> {
        let section = self
            .0
            .get_mut(name)
            .expect("only called for known sections");
        let table = table
            .as_table()
            .ok_or_else(|| Error::config(name, shown(table), "expected a [section]"))?;
        for (key, v) in table {
            let full = format!("{name}.{key}");
            match section.set(key, v) {
                None => {
                    let known: Vec<&str> = section.keys().iter().map(|k| k.0).collect();
                    return Err(Error::config(
                        full,
                        shown(v),
                        format!("unknown key (known: {})", known.join(", ")),
                    ));
                }
                Some(Err(reason)) => return Err(Error::config(full, shown(v), reason)),
                Some(Ok(())) => {}
            }
        }
        Ok(())
    }

    /// Every section as TOML, each key with its doc as comment lines above it.
    pub(super) fn to_toml(&self) -> String {
        let mut s = String::new();
        for (name, section) in &self.0 {
            s += &format!("\n[{name}]\n");
            for (key, doc) in section.keys() {
                wrap_comment(&mut s, doc);
                let v = section.get(key).expect("a listed key");
                s += &format!("{key} = {v}\n");
            }
        }
        s
    }
}

/// `doc` as `# ` comment lines of at most 90 columns.
fn wrap_comment(out: &mut String, doc: &str) {
    let mut line = String::from("#");
    for word in doc.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > 90 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    if line.len() > 1 {
        out.push_str(&line);
        out.push('\n');
    }
}

/// A value as an error message shows it: strings without their quotes.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

impl Clone for Sections {
    fn clone(&self) -> Self {
        Sections(self.0.iter().map(|(k, v)| (*k, v.clone_box())).collect())
    }
}

/// Equal when every section is: one missing on one side (a configuration made before its
/// section was registered) equals its defaults.
impl PartialEq for Sections {
    fn eq(&self, o: &Self) -> bool {
        let one_way = |a: &Sections, b: &Sections| {
            a.0.iter().all(|(k, v)| match b.0.get(k) {
                Some(w) => v.same(w.as_ref()),
                None => v.is_default(),
            })
        };
        one_way(self, o) && one_way(o, self)
    }
}
