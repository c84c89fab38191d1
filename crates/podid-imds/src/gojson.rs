//! JSON output byte-identical to Go's `encoding/json.Marshal` (Go ≤ 1.21, which upstream NMI was
//! built with) for the string-only objects this crate writes: `<`, `>`, `&`, U+2028 and U+2029
//! are escaped as `\u003c`, `\u003e`, `\u0026`, `\u2028`, `\u2029`, and backspace / form feed
//! as `\u0008` / `\u000c` instead of `\b` / `\f`.

use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};

/// serde_json formatter with Go's string escaping; compact output otherwise.
#[derive(Debug, Clone, Copy, Default)]
struct GoFormatter;

impl Formatter for GoFormatter {
    fn write_string_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        // Fast path (access tokens, ids, URLs): nothing Go escapes beyond JSON's own. U+2028 and
        // U+2029 are the only escaped characters outside ASCII; both start with byte 0xE2.
        let bytes = fragment.as_bytes();
        if !bytes
            .iter()
            .any(|&b| matches!(b, b'<' | b'>' | b'&' | 0xE2))
        {
            return writer.write_all(bytes);
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            let escape = match c {
                '<' => "\\u003c",
                '>' => "\\u003e",
                '&' => "\\u0026",
                '\u{2028}' => "\\u2028",
                '\u{2029}' => "\\u2029",
                _ => continue,
            };
            writer.write_all(&fragment.as_bytes()[start..i])?;
            writer.write_all(escape.as_bytes())?;
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W>(&mut self, writer: &mut W, char_escape: CharEscape) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        let text: &[u8] = match char_escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"\\/",
            CharEscape::Backspace => b"\\u0008",
            CharEscape::FormFeed => b"\\u000c",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let escaped = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(byte >> 4)],
                    HEX[usize::from(byte & 0x0f)],
                ];
                return writer.write_all(&escaped);
            }
        };
        writer.write_all(text)
    }
}

/// Serialise `value` the way Go's `json.Marshal` would, appending to `out`.
pub(crate) fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let mut serializer = serde_json::Serializer::with_formatter(&mut *out, GoFormatter);
    // Writing plain structs of strings and integers into a Vec cannot fail.
    value
        .serialize(&mut serializer)
        .expect("serialising strings and integers into a Vec<u8> is infallible");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go(s: &str) -> String {
        let mut out = Vec::new();
        write(&mut out, s);
        String::from_utf8(out).expect("JSON is UTF-8")
    }

    #[test]
    fn escapes_like_go_json_marshal() {
        assert_eq!(go("plain"), r#""plain""#);
        assert_eq!(go("a<b>&c"), r#""a\u003cb\u003e\u0026c""#);
        assert_eq!(go("q\"\\/"), r#""q\"\\/""#);
        assert_eq!(
            go("\n\r\t\u{8}\u{c}\u{1}\u{1f}"),
            r#""\n\r\t\u0008\u000c\u0001\u001f""#
        );
        assert_eq!(go("\u{2028}x\u{2029}é\u{7f}"), "\"\\u2028x\\u2029é\u{7f}\"");
        // Other characters starting with byte 0xE2 pass through unescaped.
        assert_eq!(go("\u{2027}\u{202a}€"), "\"\u{2027}\u{202a}€\"");
        let token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.".repeat(40);
        assert_eq!(go(&token), format!("\"{token}\""));
    }
}
