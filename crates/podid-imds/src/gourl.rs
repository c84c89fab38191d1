//! The few pieces of Go's `net/url` and `path` packages that upstream NMI's behaviour depends on,
//! reimplemented on bytes: percent-decoding in path and query-component mode, path escaping for
//! a redirect `Location`, and `path.Clean` as gorilla/mux applies it (docs/upstream.md#routing).
//!
//! Go strings are byte strings, so everything here works on `[u8]` and never assumes UTF-8.

use std::borrow::Cow;

/// Which Go unescape mode to emulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `url.PathUnescape`: `%XX` only, `+` stays `+`.
    Path,
    /// `url.QueryUnescape`: `%XX` and `+` means space.
    QueryComponent,
}

/// A `%` not followed by two hex digits (Go's `url.EscapeError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadEscape;

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Go's `url.unescape` for the two modes above. Borrows when nothing needs decoding.
pub(crate) fn unescape(input: &[u8], mode: Mode) -> Result<Cow<'_, [u8]>, BadEscape> {
    let needs_work = input
        .iter()
        .any(|&b| b == b'%' || (b == b'+' && mode == Mode::QueryComponent));
    if !needs_work {
        return Ok(Cow::Borrowed(input));
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'%' => {
                let hi = input.get(i + 1).copied().and_then(hex_value);
                let lo = input.get(i + 2).copied().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(BadEscape),
                }
                i += 3;
            }
            b'+' if mode == Mode::QueryComponent => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(Cow::Owned(out))
}

/// Go's `shouldEscape(c, encodePath)`: everything but unreserved characters and
/// `$ & + , / : ; = @` is escaped in a path.
fn path_keeps(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_'
                | b'.'
                | b'~'
                | b'$'
                | b'&'
                | b'+'
                | b','
                | b'/'
                | b':'
                | b';'
                | b'='
                | b'@'
        )
}

/// Go's `url.escape(s, encodePath)` with upper-case hex digits, appended to `out`.
pub(crate) fn escape_path_into(path: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in path {
        if path_keeps(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// Go's `path.Clean` on bytes: collapse repeated `/`, drop `.` elements, resolve `..` against
/// the previous element (never above the root), `"/"` for an empty rooted result, `"."` for an
/// empty relative one.
pub(crate) fn path_clean(path: &[u8]) -> Vec<u8> {
    if path.is_empty() {
        return b".".to_vec();
    }
    let rooted = path[0] == b'/';
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    if rooted {
        out.push(b'/');
    }
    // `dotdot` is the length of `out` below which `..` must not backtrack.
    let mut dotdot = out.len();
    let n = path.len();
    let mut r = usize::from(rooted);
    while r < n {
        if path[r] == b'/' || (path[r] == b'.' && (r + 1 == n || path[r + 1] == b'/')) {
            // Empty element or `.`: skip.
            r += 1;
        } else if path[r] == b'.'
            && path.get(r + 1) == Some(&b'.')
            && (r + 2 == n || path[r + 2] == b'/')
        {
            r += 2;
            if out.len() > dotdot {
                // Backtrack to the previous '/'.
                let mut w = out.len() - 1;
                while w > dotdot && out[w] != b'/' {
                    w -= 1;
                }
                out.truncate(w);
            } else if !rooted {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(b"..");
                dotdot = out.len();
            }
        } else {
            if (rooted && out.len() != 1) || (!rooted && !out.is_empty()) {
                out.push(b'/');
            }
            while r < n && path[r] != b'/' {
                out.push(path[r]);
                r += 1;
            }
        }
    }
    if out.is_empty() {
        out.push(b'.');
    }
    out
}

/// gorilla/mux's `cleanPath`: make the path rooted, `path.Clean` it, and put back a trailing
/// slash that `path.Clean` removed (except for the root itself).
pub(crate) fn mux_clean_path(path: &[u8]) -> Cow<'_, [u8]> {
    if is_mux_clean(path) {
        // The common case on the hot path: no allocation.
        return Cow::Borrowed(path);
    }
    if path.is_empty() {
        return Cow::Borrowed(b"/");
    }
    let rooted: Cow<'_, [u8]> = if path[0] == b'/' {
        Cow::Borrowed(path)
    } else {
        let mut p = Vec::with_capacity(path.len() + 1);
        p.push(b'/');
        p.extend_from_slice(path);
        Cow::Owned(p)
    };
    let mut cleaned = path_clean(&rooted);
    if rooted.last() == Some(&b'/') && cleaned != b"/" {
        cleaned.push(b'/');
    }
    if cleaned == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(cleaned)
    }
}

/// Whether [`mux_clean_path`] leaves `path` unchanged: rooted, and no empty, `.` or `..`
/// element (a single trailing `/` is kept by gorilla/mux, so it is allowed).
fn is_mux_clean(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let rest = rest.strip_suffix(b"/").unwrap_or(rest);
    rest.split(|&b| b == b'/')
        .all(|element| !element.is_empty() && element != b"." && element != b"..")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn clean(p: &str) -> String {
        String::from_utf8(path_clean(p.as_bytes())).unwrap()
    }

    #[test]
    fn path_clean_matches_go_examples() {
        // The table from Go's path.Clean documentation and tests.
        let cases = [
            ("", "."),
            ("abc", "abc"),
            ("abc/def", "abc/def"),
            ("a/b/c", "a/b/c"),
            (".", "."),
            ("..", ".."),
            ("../..", "../.."),
            ("../../abc", "../../abc"),
            ("/abc", "/abc"),
            ("/", "/"),
            ("abc/", "abc"),
            ("abc/def/", "abc/def"),
            ("/abc/", "/abc"),
            ("//abc", "/abc"),
            ("///abc", "/abc"),
            ("//abc//", "/abc"),
            ("abc//def//ghi", "abc/def/ghi"),
            ("abc/./def", "abc/def"),
            ("/./abc/def", "/abc/def"),
            ("abc/.", "abc"),
            ("abc/def/ghi/../jkl", "abc/def/jkl"),
            ("abc/def/../ghi/../jkl", "abc/jkl"),
            ("abc/def/..", "abc"),
            ("abc/def/../..", "."),
            ("/abc/def/../..", "/"),
            ("abc/def/../../..", ".."),
            ("/abc/def/../../..", "/"),
            ("abc/def/../../../ghi/jkl/../../../mno", "../../mno"),
            ("abc/./../def", "def"),
            ("abc//./../def", "def"),
            ("abc/../../././../def", "../../def"),
            ("/..", "/"),
            ("/../a", "/a"),
            ("/.../a", "/.../a"),
        ];
        for (input, want) in cases {
            assert_eq!(clean(input), want, "path.Clean({input:?})");
        }
    }

    #[test]
    fn mux_clean_keeps_trailing_slash_and_roots() {
        let c = |p: &str| String::from_utf8(mux_clean_path(p.as_bytes()).into_owned()).unwrap();
        assert_eq!(c(""), "/");
        assert_eq!(c("/"), "/");
        assert_eq!(c("//"), "/");
        assert_eq!(c("a/b"), "/a/b");
        assert_eq!(c("/a/b/"), "/a/b/");
        assert_eq!(
            c("//metadata/identity/oauth2/token/"),
            "/metadata/identity/oauth2/token/"
        );
        assert_eq!(c("/a/./b/../c/"), "/a/c/");
        assert_eq!(c("/a/.."), "/");
        assert_eq!(c("/a/../"), "/");
        assert!(matches!(
            mux_clean_path(b"/already/clean"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn fast_path_agrees_with_full_cleaning() {
        let samples: &[&[u8]] = &[
            b"",
            b"/",
            b"//",
            b"///",
            b"/a",
            b"/a/",
            b"/a//",
            b"//a",
            b"/a/./b",
            b"/a/.",
            b"/a/..",
            b"/a/../",
            b"/.a",
            b"/..a/",
            b"/a.",
            b"a",
            b"a/",
            b"/a/b/c/",
            b"/./",
            b"/../",
            b"/metadata/identity/oauth2/token",
            b"/metadata/identity/oauth2/token/",
        ];
        for &p in samples {
            let mut rooted = if p.first() == Some(&b'/') {
                Vec::new()
            } else {
                vec![b'/']
            };
            rooted.extend_from_slice(p);
            let mut full = path_clean(&rooted);
            if rooted.last() == Some(&b'/') && full != b"/" {
                full.push(b'/');
            }
            assert_eq!(
                is_mux_clean(p),
                full == p,
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
    }

    #[test]
    fn unescape_modes() {
        let p = |s: &str, m| unescape(s.as_bytes(), m).map(|c| c.into_owned());
        assert_eq!(p("a+b%20c", Mode::Path), Ok(b"a+b c".to_vec()));
        assert_eq!(p("a+b%20c", Mode::QueryComponent), Ok(b"a b c".to_vec()));
        assert_eq!(p("%2f%2F", Mode::Path), Ok(b"//".to_vec()));
        assert_eq!(p("%ff", Mode::Path), Ok(vec![0xff]));
        assert_eq!(p("%", Mode::Path), Err(BadEscape));
        assert_eq!(p("%4", Mode::Path), Err(BadEscape));
        assert_eq!(p("%zz", Mode::QueryComponent), Err(BadEscape));
        assert!(matches!(
            unescape(b"plain", Mode::QueryComponent),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn escape_path_like_go() {
        let mut s = String::new();
        escape_path_into(b"/a b/?#%/~-_.$&+,:;=@!'()*\xff", &mut s);
        assert_eq!(s, "/a%20b/%3F%23%25/~-_.$&+,:;=@%21%27%28%29%2A%FF");
    }
}
