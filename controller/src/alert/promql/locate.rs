//! Where a construct sits in the expression text. `promql-parser` keeps no
//! positions in its syntax tree, so refusals find their column with this small
//! scanner over PromQL's tokens (strings and comments skipped, braces and
//! brackets tracked).

/// What a token is, as far as finding constructs needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Word,
    Str,
    Number,
    Punct,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    text: String,
    /// 1-based character column in the whole text.
    column: usize,
    /// Inside `{...}` (label matchers).
    in_braces: bool,
}

/// The tokens of one expression text.
#[derive(Debug, Clone, Default)]
pub(super) struct Tokens {
    tokens: Vec<Token>,
}

impl Tokens {
    /// Scans `text`; anything it does not understand becomes a one-character
    /// punctuation token, so scanning never fails.
    pub(super) fn scan(text: &str) -> Self {
        let chars: Vec<char> = text.chars().collect();
        let mut tokens = Vec::new();
        let (mut i, mut braces) = (0, 0usize);
        while let Some(&c) = chars.get(i) {
            let start = i;
            let kind = if c.is_whitespace() {
                i += 1;
                continue;
            } else if c == '#' {
                while chars.get(i).is_some_and(|&c| c != '\n') {
                    i += 1;
                }
                continue;
            } else if matches!(c, '"' | '\'' | '`') {
                i += 1;
                while let Some(&d) = chars.get(i) {
                    i += 1;
                    if d == '\\' && c != '`' {
                        i += 1;
                    } else if d == c {
                        break;
                    }
                }
                Kind::Str
            } else if c.is_ascii_alphabetic() || c == '_' {
                while chars.get(i).is_some_and(|&d| d.is_ascii_alphanumeric() || d == '_' || d == ':') {
                    i += 1;
                }
                Kind::Word
            } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
                i += 1;
                while let Some(&d) = chars.get(i) {
                    let exponent_sign = matches!(d, '+' | '-') && matches!(chars.get(i - 1), Some('e' | 'E'));
                    if d.is_ascii_alphanumeric() || d == '.' || d == '_' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
                Kind::Number
            } else {
                let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
                i += if matches!(two.as_str(), "==" | "!=" | "=~" | "!~" | ">=" | "<=") { 2 } else { 1 };
                Kind::Punct
            };
            let text: String = chars[start..i.min(chars.len())].iter().collect();
            if text == "}" {
                braces = braces.saturating_sub(1);
            }
            tokens.push(Token { kind, text: text.clone(), column: start + 1, in_braces: braces > 0 });
            if text == "{" {
                braces += 1;
            }
        }
        Self { tokens }
    }

    /// The column of the first `word` (outside label matchers) that is followed
    /// by `(` or, for aggregations, by `by`/`without`: a call of `word`.
    pub(super) fn call(&self, word: &str) -> Option<usize> {
        self.tokens.iter().enumerate().find_map(|(i, t)| {
            let next = self.tokens.get(i + 1).map(|n| n.text.as_str());
            let is_call = matches!(next, Some("(" | "by" | "without"));
            (t.kind == Kind::Word && !t.in_braces && t.text == word && is_call).then_some(t.column)
        })
    }

    /// The column of the first `word` outside label matchers.
    pub(super) fn word(&self, word: &str) -> Option<usize> {
        self.tokens.iter().find(|t| t.kind == Kind::Word && !t.in_braces && t.text == word).map(|t| t.column)
    }

    /// The column of the first `word` inside label matchers.
    pub(super) fn word_in_braces(&self, word: &str) -> Option<usize> {
        self.tokens.iter().find(|t| t.kind == Kind::Word && t.in_braces && t.text == word).map(|t| t.column)
    }

    /// The column of the first punctuation `p` outside label matchers.
    pub(super) fn punct(&self, p: &str) -> Option<usize> {
        self.tokens.iter().find(|t| t.kind == Kind::Punct && !t.in_braces && t.text == p).map(|t| t.column)
    }

    /// The column of the `offset` keyword followed by a minus sign.
    pub(super) fn negative_offset(&self) -> Option<usize> {
        self.tokens.windows(2).find(|w| w[0].text == "offset" && w[1].text == "-").map(|w| w[0].column)
    }

    /// The column of the first `[` whose brackets hold a `:` (a subquery).
    pub(super) fn subquery(&self) -> Option<usize> {
        let mut open = None;
        for t in self.tokens.iter().filter(|t| t.kind == Kind::Punct && !t.in_braces) {
            match t.text.as_str() {
                "[" => open = Some(t.column),
                "]" => open = None,
                ":" if open.is_some() => return open,
                _ => {}
            }
        }
        None
    }

    /// How many tokens the text has.
    pub(super) fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The deepest nesting of `(`, `[` and `{`, and the column where it is
    /// first reached.
    pub(super) fn deepest(&self) -> (usize, usize) {
        let (mut depth, mut deepest) = (0usize, (0, 1));
        for t in self.tokens.iter().filter(|t| t.kind == Kind::Punct) {
            match t.text.as_str() {
                "(" | "[" | "{" => {
                    depth += 1;
                    if depth > deepest.0 {
                        deepest = (depth, t.column);
                    }
                }
                ")" | "]" | "}" => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        deepest
    }

    /// The column of the first string outside label matchers.
    pub(super) fn string(&self) -> Option<usize> {
        self.tokens.iter().find(|t| t.kind == Kind::Str && !t.in_braces).map(|t| t.column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_constructs_by_column() {
        let t = Tokens::scan(r#"sum by (quantile) (x{quantile="0.5"}) + quantile(0.5, y)"#);
        assert_eq!(t.call("quantile"), Some(41));
        assert_eq!(t.word("quantile"), Some(9));
        assert_eq!(t.word_in_braces("quantile"), Some(22));
        let t = Tokens::scan("rate(x[5m:1m]) @ 100 # a comment with [1:2] and \"quotes\"");
        assert_eq!(t.subquery(), Some(7));
        assert_eq!(t.punct("@"), Some(16));
        assert_eq!(t.string(), None);
        let t = Tokens::scan("x{a=\"}\"} offset -5m + 'é' + 1e-3");
        assert_eq!(t.negative_offset(), Some(10));
        assert_eq!(t.string(), Some(23));
        let t = Tokens::scan("é + \"x\"");
        assert_eq!(t.string(), Some(5), "columns count characters, not bytes");
    }
}
