//! Errors as one line of text, for what travels as a string: a reply on the control socket, a
//! log field, a report that keeps a failed migration as text.

use std::error::Error;

/// An error and each of its causes, joined by `: ` on one line (as `anyhow`'s `{:#}`). A cause
/// whose text its parent's message already ends with (some crates print their source in their
/// own message) is not repeated.
pub fn chain(err: &dyn Error) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer: inner")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn causes_follow_the_message_once() {
        assert_eq!(
            chain(&Outer(std::io::Error::other("inner"))),
            "outer: inner"
        );
        assert_eq!(
            chain(&Repeats(std::io::Error::other("inner"))),
            "outer: inner"
        );
    }
}
