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

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn only_control_characters_are_escaped() {
        assert_eq!(printable("vm-1 'a' \"b\""), "vm-1 'a' \"b\"");
        assert_eq!(printable("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
    }
}
