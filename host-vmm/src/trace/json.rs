//! A [`Timeline`] as trace-event JSON (`{"traceEvents": [...]}`), the format Perfetto and
//! chrome://tracing open: name metadata for every process and track, a complete event
//! ("X") per span and an instant ("i") per mark; times in microseconds.

use std::collections::HashMap;
use std::io::Write;

use serde_json::json;

use super::Timeline;

/// Writes `t`; `other` goes into the file's `otherData` (settings, counts).
pub fn write(t: &Timeline, other: serde_json::Value, out: &mut dyn Write) -> std::io::Result<()> {
    let us = |ns: u64| ns as f64 / 1000.0;
    writeln!(out, "{{\"traceEvents\": [")?;
    let mut first = true;
    let mut emit = |v: serde_json::Value, out: &mut dyn Write| -> std::io::Result<()> {
        if !first {
            writeln!(out, ",")?;
        }
        first = false;
        write!(out, "{v}")
    };
    for (pi, p) in t.processes.iter().enumerate() {
        emit(
            json!({"ph": "M", "name": "process_name", "pid": p.pid, "args": {"name": p.name}}),
            out,
        )?;
        emit(
            json!({"ph": "M", "name": "process_sort_index", "pid": p.pid,
                   "args": {"sort_index": pi}}),
            out,
        )?;
        for (ti, tr) in p.tracks.iter().enumerate() {
            emit(
                json!({"ph": "M", "name": "thread_name", "pid": p.pid, "tid": tr.tid,
                       "args": {"name": tr.name}}),
                out,
            )?;
            emit(
                json!({"ph": "M", "name": "thread_sort_index", "pid": p.pid, "tid": tr.tid,
                       "args": {"sort_index": ti}}),
                out,
            )?;
            for s in &tr.spans {
                emit(
                    json!({"ph": "X", "name": s.name, "cat": s.cat, "pid": p.pid,
                           "tid": tr.tid, "ts": us(s.start), "dur": us(s.dur), "args": s.args}),
                    out,
                )?;
            }
            for m in &tr.marks {
                emit(
                    json!({"ph": "i", "s": "t", "name": m.name, "cat": m.cat, "pid": p.pid,
                           "tid": tr.tid, "ts": us(m.at), "args": m.args}),
                    out,
                )?;
            }
        }
    }
    writeln!(out, "\n],")?;
    let other = json!({ "losses": t.losses, "run": other });
    writeln!(out, "\"displayTimeUnit\": \"ns\", \"otherData\": {other}}}")
}

/// Reads a trace this module wrote back into a [`Timeline`] (processes and tracks from the
/// name metadata, spans and marks from "X" and "i" events; other events are skipped).
pub fn read(text: &str) -> Result<Timeline, String> {
    use super::{Mark, Process, Span, Track};
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let events = v
        .get("traceEvents")
        .and_then(|e| e.as_array())
        .ok_or("no traceEvents array")?;
    let mut t = Timeline::default();
    let ns = |e: &serde_json::Value, k: &str| {
        e.get(k)
            .and_then(|x| x.as_f64())
            .map(|us| (us.max(0.0) * 1000.0) as u64)
    };
    let text_of = |e: &serde_json::Value, k: &str| {
        e.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let cat_of = |e: &serde_json::Value| -> &'static str {
        // Categories are a closed set: keep the known ones for colouring.
        let c = e.get("cat").and_then(|c| c.as_str()).unwrap_or_default();
        super::CATEGORIES
            .iter()
            .find(|(k, _)| *k == c)
            .map_or("other", |(k, _)| k)
    };
    // Indexes, so that a file with many processes and tracks reads in linear time.
    let mut procs: HashMap<u32, usize> = HashMap::new();
    let mut tracks: HashMap<(u32, u32), usize> = HashMap::new();
    for e in events {
        let pid = e.get("pid").and_then(|p| p.as_u64()).unwrap_or(0) as u32;
        let tid = e.get("tid").and_then(|p| p.as_u64()).unwrap_or(0) as u32;
        let proc_idx = *procs.entry(pid).or_insert_with(|| {
            t.processes.push(Process {
                pid,
                ..Process::default()
            });
            t.processes.len() - 1
        });
        let p = &mut t.processes[proc_idx];
        let mut track = |p: &mut Process| -> usize {
            *tracks.entry((pid, tid)).or_insert_with(|| {
                p.tracks.push(Track {
                    tid,
                    ..Track::default()
                });
                p.tracks.len() - 1
            })
        };
        let ph = e.get("ph").and_then(|p| p.as_str()).unwrap_or_default();
        let name = e
            .get("args")
            .and_then(|a| a.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string();
        match (ph, text_of(e, "name").as_str()) {
            ("M", "process_name") => p.name = name,
            ("M", "thread_name") => {
                let i = track(p);
                p.tracks[i].name = name;
            }
            ("X", _) => {
                let (Some(start), Some(dur)) = (ns(e, "ts"), ns(e, "dur")) else {
                    continue;
                };
                let args = e.get("args").and_then(|a| a.as_object()).cloned();
                let i = track(p);
                p.tracks[i].spans.push(Span {
                    start,
                    dur,
                    name: text_of(e, "name"),
                    cat: cat_of(e),
                    args: args.unwrap_or_default(),
                });
            }
            ("i", _) => {
                let Some(at) = ns(e, "ts") else { continue };
                let args = e.get("args").and_then(|a| a.as_object()).cloned();
                let i = track(p);
                p.tracks[i].marks.push(Mark {
                    at,
                    name: text_of(e, "name"),
                    cat: cat_of(e),
                    args: args.unwrap_or_default(),
                });
            }
            _ => {}
        }
    }
    Ok(t)
}
