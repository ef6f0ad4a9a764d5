//! A small Prometheus text-format (0.0.4) parser for tests that read
//! kvgate's `/metrics`: [`parse_exposition`] checks the exposition's shape
//! (panicking on what Prometheus would refuse) and returns its samples.

use std::collections::{BTreeMap, BTreeSet};

/// A sample's labels.
pub type Labels = BTreeMap<String, String>;

#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name → type.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The family a sample name belongs to, with its type.
    pub fn family_of(&self, name: &str) -> Option<(String, &str)> {
        if let Some(t) = self.types.get(name) {
            return Some((name.to_string(), t));
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                match self.types.get(base).map(String::as_str) {
                    Some("histogram") => return Some((base.to_string(), "histogram")),
                    Some("summary") if suffix != "_bucket" => {
                        return Some((base.to_string(), "summary"))
                    }
                    _ => {}
                }
            }
        }
        // OpenMetrics-style: `# TYPE x counter` for samples `x_total`.
        let base = name.strip_suffix("_total")?;
        (self.types.get(base).map(String::as_str) == Some("counter"))
            .then(|| (base.to_string(), "counter"))
    }

    pub fn type_of(&self, name: &str) -> Option<&str> {
        self.family_of(name).map(|(_, t)| t)
    }

    /// Samples of a family (its own name, or a name that resolves to it).
    pub fn family_samples(&self, family: &str) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|x| {
                x.name == family || self.family_of(&x.name).is_some_and(|(f, _)| f == family)
            })
            .collect()
    }
}

fn valid_metric_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn valid_label_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let consumed;
        'labels: loop {
            let mut lname = String::new();
            loop {
                match chars.next() {
                    Some((i, '}')) if lname.trim().is_empty() => {
                        consumed = i + 1;
                        break 'labels;
                    }
                    Some((_, '=')) => break,
                    Some((_, c)) => lname.push(c),
                    None => return Err("unterminated label set".into()),
                }
            }
            let lname = lname.trim().to_string();
            if !valid_label_name(&lname) {
                return Err(format!("bad label name {lname:?}"));
            }
            if chars.next().map(|x| x.1) != Some('"') {
                return Err(format!("label {lname} value not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next().map(|x| x.1) {
                        Some('n') => value.push('\n'),
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        other => return Err(format!("bad escape \\{other:?}")),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            if labels.insert(lname.clone(), value).is_some() {
                return Err(format!("label {lname} twice"));
            }
            match chars.next() {
                Some((_, ',')) => {}
                Some((i, '}')) => {
                    consumed = i + 1;
                    break;
                }
                other => return Err(format!("expected , or }} after a label, got {other:?}")),
            }
        }
        rest = &inner[consumed..];
    }
    if !rest.starts_with(' ') {
        return Err("no space before the value".into());
    }
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .and_then(parse_float)
        .ok_or_else(|| format!("bad value in {rest:?}"))?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses and checks Prometheus text: HELP/TYPE comments well-formed, one
/// TYPE per family and before its samples, each family's samples in one
/// group, every sample `name{labels} value`, kvgate's families typed, and
/// histograms with increasing `le`, cumulative buckets, `+Inf` = `_count`
/// and a `_sum`.
pub fn parse_exposition(text: &str) -> Exposition {
    let mut e = Exposition::default();
    let mut helps = BTreeSet::new();
    let mut families_done: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut sample_lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", i + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("HELP") => {
                    let name = parts
                        .next()
                        .unwrap_or_else(|| panic!("{at}: HELP without a name"));
                    assert!(valid_metric_name(name), "{at}: bad name");
                    assert!(helps.insert(name.to_string()), "{at}: second HELP");
                }
                Some("TYPE") => {
                    let name = parts
                        .next()
                        .unwrap_or_else(|| panic!("{at}: TYPE without a name"));
                    assert!(valid_metric_name(name), "{at}: bad name");
                    let ty = parts
                        .next()
                        .unwrap_or_else(|| panic!("{at}: TYPE without a type"));
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                        "{at}: unknown type"
                    );
                    assert!(
                        e.types.insert(name.to_string(), ty.to_string()).is_none(),
                        "{at}: second TYPE"
                    );
                    assert!(
                        !e.samples
                            .iter()
                            .any(|x| e.family_of(&x.name).is_some_and(|(f, _)| f == name)),
                        "{at}: TYPE after samples of its family"
                    );
                }
                _ => {}
            }
            continue;
        }
        let sample = parse_sample(line).unwrap_or_else(|err| panic!("{at}: {err}"));
        let family = e
            .family_of(&sample.name)
            .map(|(f, _)| f)
            .unwrap_or_else(|| sample.name.clone());
        if current.as_deref() != Some(&family) {
            assert!(
                !families_done.contains(&family),
                "{at}: samples of {family} are not grouped"
            );
            if let Some(prev) = current.replace(family.clone()) {
                families_done.insert(prev);
            }
        }
        if family.starts_with("kvgate_") {
            assert!(e.types.contains_key(&family), "{at}: no TYPE for {family}");
            assert!(helps.contains(&family), "{at}: no HELP for {family}");
        }
        sample_lines.push(at);
        e.samples.push(sample);
    }
    // Histograms.
    let histograms: Vec<String> = e
        .types
        .iter()
        .filter(|(_, t)| *t == "histogram")
        .map(|(n, _)| n.clone())
        .collect();
    for h in histograms {
        let strip_le = |l: &BTreeMap<String, String>| {
            let mut l = l.clone();
            l.remove("le");
            l
        };
        let mut groups: Vec<(Labels, Vec<(f64, f64)>)> = Vec::new();
        for x in e.samples.iter().filter(|x| x.name == format!("{h}_bucket")) {
            let le = x
                .labels
                .get("le")
                .and_then(|v| parse_float(v))
                .unwrap_or_else(|| panic!("{h}: bucket without a numeric le: {x:?}"));
            let key = strip_le(&x.labels);
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.1.push((le, x.value)),
                None => groups.push((key, vec![(le, x.value)])),
            }
        }
        assert!(!groups.is_empty(), "histogram {h} has no buckets");
        for (labels, buckets) in groups {
            for w in buckets.windows(2) {
                assert!(
                    w[0].0 < w[1].0,
                    "{h}{labels:?}: le not increasing: {buckets:?}"
                );
                assert!(
                    w[0].1 <= w[1].1,
                    "{h}{labels:?}: buckets not cumulative: {buckets:?}"
                );
            }
            let last = buckets.last().unwrap();
            assert!(
                last.0.is_infinite() && last.0 > 0.0,
                "{h}{labels:?}: no +Inf bucket"
            );
            let count = e
                .samples
                .iter()
                .find(|x| x.name == format!("{h}_count") && x.labels == labels)
                .unwrap_or_else(|| panic!("{h}{labels:?}: no _count"));
            assert_eq!(count.value, last.1, "{h}{labels:?}: +Inf bucket != _count");
            assert!(
                e.samples
                    .iter()
                    .any(|x| x.name == format!("{h}_sum") && x.labels == labels),
                "{h}{labels:?}: no _sum"
            );
        }
    }
    e
}
