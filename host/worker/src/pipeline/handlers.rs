//! The built-in handlers: two task types, two genuinely different strategies each.
//!
//! - `summarize` (input `{"title", "text"}`): `lead` answers the first sentence (a position
//!   prior: right when the text leads with its point); `title-match` answers the sentence that
//!   shares the most words with the title (a relevance search: right wherever the point is).
//! - `chat` (input `{"messages": [{"role", "content"}]}`, a window of a conversation whose last
//!   user message asks about something said earlier): `recent` answers from the most recent
//!   statement (a recency prior, one step); `recall` is a two-step handler: step 1 reads what
//!   the question asks for and notes it in the conversation, step 2 searches the whole window
//!   for it. `task.after_step` fires between the steps and may change the messages; step 2
//!   works from the messages as the hook left them.
//!
//! The summarize handlers honour the variant `short`: the answer cut to 8 words (or to the
//! profile's `maxWords` when that is smaller).

use serde_json::{Value, json};

/// Handlers per built-in task type; the first is the default.
pub(crate) const BUILT_IN: &[(&str, &[&str])] = &[
    ("summarize", &["lead", "title-match"]),
    ("chat", &["recent", "recall"]),
];

/// The built-in handlers of `task_type`, default first.
pub(crate) fn built_in(task_type: &str) -> &'static [&'static str] {
    BUILT_IN
        .iter()
        .find(|(t, _)| *t == task_type)
        .map_or(&[], |(_, handlers)| handlers)
}

/// What a handler needs besides the input.
pub(crate) struct Context<'a> {
    pub(crate) variant: Option<&'a str>,
    pub(crate) max_words: Option<usize>,
}

/// A step's boundary: called between the steps of a multi-step handler with the step number
/// and the messages so far; answers the messages the next step works from.
pub(crate) type AfterStep<'a> = dyn FnMut(usize, Vec<Value>) -> Result<Vec<Value>, String> + 'a;

/// Runs the built-in `handler` on `input`.
pub(crate) fn run(
    task_type: &str,
    handler: &str,
    input: &Value,
    context: &Context<'_>,
    after_step: &mut AfterStep<'_>,
) -> Result<String, String> {
    let output = match (task_type, handler) {
        ("summarize", "lead") => lead(&text_of(input)?),
        ("summarize", "title-match") => title_match(&title_of(input)?, &text_of(input)?),
        ("chat", "recent") => recent(&messages_of(input)?),
        ("chat", "recall") => recall(messages_of(input)?, after_step)?,
        _ => {
            return Err(format!(
                "no built-in handler `{handler}` for task type `{task_type}`"
            ));
        }
    };
    Ok(match (task_type, context.variant) {
        ("summarize", Some("short")) => first_words(&output, context.max_words.unwrap_or(8).min(8)),
        _ => output,
    })
}

fn text_of(input: &Value) -> Result<String, String> {
    input
        .get("text")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "input.text is missing or not a string".to_owned())
}

fn title_of(input: &Value) -> Result<String, String> {
    input
        .get("title")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "input.title is missing or not a string".to_owned())
}

fn messages_of(input: &Value) -> Result<Vec<Value>, String> {
    input
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| "input.messages is missing or not an array".to_owned())
}

fn content(message: &Value) -> &str {
    message.get("content").and_then(Value::as_str).unwrap_or("")
}

fn role(message: &Value) -> &str {
    message.get("role").and_then(Value::as_str).unwrap_or("")
}

/// Splits text into sentences at `.`, `!` and `?` followed by a space or the end.
pub(crate) fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if matches!(b, b'.' | b'!' | b'?')
            && bytes.get(i + 1).is_none_or(|n| n.is_ascii_whitespace())
        {
            let sentence = text[start..=i].trim();
            if !sentence.is_empty() {
                out.push(sentence);
            }
            start = i + 1;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Lower-case alphanumeric words.
pub(crate) fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn first_words(text: &str, n: usize) -> String {
    text.split_whitespace()
        .take(n)
        .collect::<Vec<_>>()
        .join(" ")
}

fn lead(text: &str) -> String {
    sentences(text)
        .first()
        .map_or_else(String::new, |s| (*s).to_owned())
}

fn title_match(title: &str, text: &str) -> String {
    let title_words = words(title);
    let mut best: Option<(usize, &str)> = None;
    for sentence in sentences(text) {
        let overlap = words(sentence)
            .iter()
            .filter(|w| title_words.contains(w))
            .count();
        if best.is_none_or(|(b, _)| overlap > b) {
            best = Some((overlap, sentence));
        }
    }
    best.map_or_else(String::new, |(_, s)| s.to_owned())
}

/// The value of a statement "My <attribute> is <value>.", with the attribute.
fn statement(text: &str) -> Option<(String, String)> {
    let rest = text.trim().strip_prefix("My ")?;
    let (attribute, value) = rest.split_once(" is ")?;
    Some((
        attribute.trim().to_lowercase(),
        value.trim().trim_end_matches(['.', '!']).to_owned(),
    ))
}

/// The attribute a question "What is my <attribute>?" asks for.
fn question(text: &str) -> Option<String> {
    let rest = text.trim().strip_prefix("What is my ")?;
    Some(rest.trim().trim_end_matches('?').trim().to_lowercase())
}

fn recent(messages: &[Value]) -> String {
    messages
        .iter()
        .rev()
        .filter(|m| role(m) == "user")
        .find_map(|m| statement(content(m)))
        .map_or_else(|| "I don't know.".to_owned(), |(_, value)| value)
}

const NOTE_PREFIX: &str = "Looking for: ";

fn recall(messages: Vec<Value>, after_step: &mut AfterStep<'_>) -> Result<String, String> {
    // Step 1: what does the last question ask for?
    let asked = messages
        .iter()
        .rev()
        .filter(|m| role(m) == "user")
        .find_map(|m| question(content(m)));
    let Some(asked) = asked else {
        return Ok("I don't know.".to_owned());
    };
    let mut messages = messages;
    messages.push(json!({"role": "assistant", "content": format!("{NOTE_PREFIX}{asked}")}));
    let messages = after_step(1, messages)?;
    // Step 2: search the whole window for what the (possibly revised) note asks for.
    let wanted = messages
        .iter()
        .rev()
        .find_map(|m| content(m).strip_prefix(NOTE_PREFIX))
        .map(str::to_lowercase)
        .unwrap_or(asked);
    Ok(messages
        .iter()
        .rev()
        .filter(|m| role(m) == "user")
        .filter_map(|m| statement(content(m)))
        .find(|(attribute, _)| *attribute == wanted)
        .map_or_else(|| "I don't know.".to_owned(), |(_, value)| value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_hook() -> impl FnMut(usize, Vec<Value>) -> Result<Vec<Value>, String> {
        |_, m| Ok(m)
    }

    #[test]
    fn summarize_strategies_differ() {
        let input = json!({
            "title": "Zephyr battery life",
            "text": "The company was founded in 1998. The Zephyr battery lasts 14 hours. Shipping starts soon."
        });
        let ctx = Context {
            variant: None,
            max_words: None,
        };
        let mut hook = no_hook();
        assert_eq!(
            run("summarize", "lead", &input, &ctx, &mut hook).unwrap(),
            "The company was founded in 1998."
        );
        assert_eq!(
            run("summarize", "title-match", &input, &ctx, &mut hook).unwrap(),
            "The Zephyr battery lasts 14 hours."
        );
        let short = Context {
            variant: Some("short"),
            max_words: Some(3),
        };
        assert_eq!(
            run("summarize", "title-match", &input, &short, &mut hook).unwrap(),
            "The Zephyr battery"
        );
    }

    #[test]
    fn chat_strategies_differ_and_the_hook_steers_step_two() {
        let input = json!({"messages": [
            {"role": "user", "content": "My city is Lisbon."},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "My order number is 4821."},
            {"role": "user", "content": "What is my city?"}
        ]});
        let ctx = Context {
            variant: None,
            max_words: None,
        };
        let mut hook = no_hook();
        assert_eq!(
            run("chat", "recent", &input, &ctx, &mut hook).unwrap(),
            "4821"
        );
        assert_eq!(
            run("chat", "recall", &input, &ctx, &mut hook).unwrap(),
            "Lisbon"
        );
        let mut steps = Vec::new();
        let mut redirect = |step: usize, mut messages: Vec<Value>| {
            steps.push(step);
            messages.push(json!({"role": "assistant", "content": "Looking for: order number"}));
            Ok(messages)
        };
        assert_eq!(
            run("chat", "recall", &input, &ctx, &mut redirect).unwrap(),
            "4821"
        );
        assert_eq!(steps, [1]);
    }

    #[test]
    fn sentences_split() {
        assert_eq!(sentences("A b. C d? E"), ["A b.", "C d?", "E"]);
        assert_eq!(sentences("Version 1.5 ships."), ["Version 1.5 ships."]);
    }
}
