//! JSON values from clients (tool schemas, call arguments, template kwargs) kept as their raw
//! text, so key order survives into the template without serde_json's workspace-wide
//! `preserve_order`; and `tojson` output byte-identical to Python's `json.dumps`.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Any JSON value, exactly as the client wrote it. Checked when read: serde_json's raw values
/// skip number ranges and nesting depth, which the template conversion then refuses (`1e400`,
/// 200 nested arrays), so such a request is refused here, as bad input, not later.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Json(Box<RawValue>);

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Json::checked(raw).map_err(serde::de::Error::custom)
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Json {
    pub fn parse(text: &str) -> serde_json::Result<Self> {
        Json::checked(RawValue::from_string(text.to_owned())?)
    }

    fn checked(raw: Box<RawValue>) -> serde_json::Result<Self> {
        serde_json::from_str::<Value>(raw.get())?;
        Ok(Json(raw))
    }

    pub fn text(&self) -> &str {
        self.0.get()
    }

    /// The value as the template sees it (maps keep the client's key order).
    pub fn to_template_value(&self) -> Value {
        serde_json::from_str(self.0.get()).expect("checked when read")
    }
}

/// The `tojson` filter as transformers defines it: `json.dumps(x, ensure_ascii=False,
/// indent=indent, sort_keys=sort_keys)`. Unlike minijinja's own it escapes no HTML characters
/// and uses Python's separators `", "` and `": "`.
pub fn tojson_filter(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let options = DumpOptions {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    dump(value, &options, 0, &mut out)?;
    Ok(Value::from(out))
}

struct DumpOptions {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn dump(value: &Value, o: &DumpOptions, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => out.push_str(&python_float_repr(f64::try_from(value.clone())?)),
        ValueKind::String => dump_str(value.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq => {
            let items: Vec<Value> = value.try_iter()?.collect();
            dump_container(out, ('[', ']'), o, depth, &items, |item, out| {
                dump(item, o, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if o.sort_keys {
                keys.sort();
            }
            dump_container(out, ('{', '}'), o, depth, &keys, |key, out| {
                // Python turns non-string keys into strings (1 -> "1", None -> "null").
                match key.as_str() {
                    Some(s) => dump_str(s, o.ensure_ascii, out),
                    None => {
                        let mut k = String::new();
                        dump(key, o, depth + 1, &mut k)?;
                        dump_str(&k, o.ensure_ascii, out);
                    }
                }
                out.push_str(": ");
                dump(&value.get_item(key)?, o, depth + 1, out)
            })?;
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// Writes `open items close` with Python's separators and, with `indent`, its line layout.
fn dump_container(
    out: &mut String,
    (open, close): (char, char),
    o: &DumpOptions,
    depth: usize,
    items: &[Value],
    mut each: impl FnMut(&Value, &mut String) -> Result<(), minijinja::Error>,
) -> Result<(), minijinja::Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = o.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            // With an indent Python's item separator is "," (no trailing space).
            out.push_str(if o.indent.is_some() { "," } else { ", " });
        }
        newline(out, depth + 1);
        each(item, out)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// A JSON string literal as Python's `json.dumps` writes it.
fn dump_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-trip digits, fixed notation for exponents in
/// -4..16 (always with a fractional part), otherwise `d.ddde+XX`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let fixed = x.to_string();
        if fixed.contains('.') { fixed } else { fixed + ".0" }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use minijinja::Environment;

    use super::*;

    #[test]
    fn json_the_template_could_not_take_is_refused_when_read() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        for bad in ["{\"x\":1e400}", deep.as_str()] {
            assert!(Json::parse(bad).is_err(), "{bad:.40}");
            assert!(serde_json::from_str::<Json>(bad).is_err(), "{bad:.40}");
        }
        assert!(Json::parse("{\"x\":1e300}").is_ok());
    }

    fn render(template: &str, json: &str) -> String {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson_filter);
        let v = Json::parse(json).unwrap().to_template_value();
        env.render_str(template, minijinja::context! { v }).unwrap()
    }

    #[test]
    fn matches_python_json_dumps() {
        // Expected values from Python 3: json.dumps(json.loads(s), ensure_ascii=False).
        let s = r#"{"z": 1, "a": [true, false, null, 1.5, -0.0, 1e16, 1e-05, 0.0001, 2.0], "<&'>": "é\n\t\u0001\"\\/", "e": {}, "l": []}"#;
        assert_eq!(
            render("{{ v | tojson }}", s),
            r#"{"z": 1, "a": [true, false, null, 1.5, -0.0, 1e+16, 1e-05, 0.0001, 2.0], "<&'>": "é\n\t\u0001\"\\/", "e": {}, "l": []}"#
        );
    }

    #[test]
    fn indent_sort_keys_and_ascii_follow_python() {
        // json.dumps({"b": [1, 2], "a": {}}, indent=2, sort_keys=True, ensure_ascii=True) with "é😀".
        assert_eq!(
            render(
                "{{ v | tojson(indent=2, sort_keys=true) }}",
                r#"{"b": [1, 2], "a": {}}"#
            ),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2\n  ]\n}"
        );
        assert_eq!(
            render("{{ v | tojson(ensure_ascii=true) }}", r#""é😀""#),
            r#""\u00e9\ud83d\ude00""#
        );
    }

    #[test]
    fn float_repr_is_pythons() {
        for (x, repr) in [
            (0.1, "0.1"),
            (100.0, "100.0"),
            (1e15, "1000000000000000.0"),
            (1.5e16, "1.5e+16"),
            (1.2345e-5, "1.2345e-05"),
            (1e100, "1e+100"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(python_float_repr(x), repr);
        }
    }

    #[test]
    fn unknown_arguments_are_refused() {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson_filter);
        let e = env.render_str("{{ 1 | tojson(indnt=2) }}", ()).unwrap_err();
        assert!(e.to_string().contains("indnt"), "{e}");
    }
}
