//! A [`Timeline`] as trace-event JSON (`{"traceEvents": [...]}`), the format Perfetto and
//! chrome://tracing open: name metadata for every process and track, a complete event
//! ("X") per span and an instant ("i") per mark; times in microseconds.

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
