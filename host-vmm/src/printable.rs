//! Operator text shown back in messages: control characters escaped (`\u{1b}`, `\n`), the
//! rest as typed, so that nothing typed (or fed in by a script) can forge console output.

/// `s` with its control characters escaped.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Writes `pvsync: error: MSG` as one line, `msg`'s control characters (newlines of a
/// quoted file's lines, escape sequences in a path) escaped.
pub fn say_error(log: &mut dyn std::io::Write, msg: impl std::fmt::Display) {
    let _ = writeln!(log, "pvsync: error: {}", printable(&msg.to_string()));
}

/// Like [`printable`], cut after `max` characters (saying how long `s` was): for values
/// that may be huge, such as a command line.
pub fn printable_short(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return printable(s);
    }
    let head: String = s.chars().take(max).collect();
    format!("{}... ({} bytes)", printable(&head), s.len())
}

#[cfg(test)]
mod tests {
    use super::{printable, printable_short};

    #[test]
    fn long_text_is_cut_and_its_length_said() {
        assert_eq!(printable_short("abc", 3), "abc");
        assert_eq!(printable_short("abcd\n", 2), "ab... (5 bytes)");
        assert_eq!(printable_short("\u{1b}bc", 1), "\\u{1b}... (3 bytes)");
    }

    #[test]
    fn only_control_characters_are_escaped() {
        assert_eq!(printable("vm-1 'a' \"b\""), "vm-1 'a' \"b\"");
        assert_eq!(printable("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
    }
}
