//! The bundled example task set, generated deterministically from a seed (`worker
//! example-tasks`).
//!
//! Half `summarize`, half `chat` tasks, each with a reference answer, built so that the
//! strategies genuinely differ:
//!
//! - summarize: a short article whose title names its point; the point is the first sentence
//!   in a quarter of the articles and elsewhere in the rest, so `title-match` beats `lead`.
//! - chat: a conversation in which the user states one to four facts, then asks about one of
//!   them; `recall` finds any of them, `recent` only the last one stated.

use serde_json::{Value, json};

/// The generator's random source: the seeded, reproducible one plugins use.
struct Rng(plugin_api::assign::Random);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const PRODUCTS: &[&str] = &[
    "Zephyr", "Orion", "Nimbus", "Quasar", "Falcon", "Juniper", "Atlas", "Comet", "Helix",
    "Vertex", "Sierra", "Tundra", "Aurora", "Pulsar", "Mistral", "Cobalt",
];

/// Title words and the sentence that states the point, with `{p}` the product, `{n}` a number.
const POINTS: &[(&str, &str)] = &[
    (
        "battery life",
        "The {p} battery lasts {n} hours on a single charge.",
    ),
    (
        "price",
        "The {p} price starts at {n} dollars for the base model.",
    ),
    (
        "weight",
        "The {p} weight comes to {n} grams without the case.",
    ),
    (
        "screen size",
        "The {p} screen size measures {n} millimetres across.",
    ),
    ("warranty", "The {p} warranty covers {n} months of repairs."),
    ("storage", "The {p} storage holds {n} gigabytes of data."),
];

const FILLERS: &[&str] = &[
    "The company was founded in a small garage many years ago.",
    "Analysts expect more announcements next quarter.",
    "Several retailers plan to carry the product in stores.",
    "Shipping is expected to begin in the spring.",
    "Early reviewers praised the packaging and the manual.",
    "A launch event took place in the capital last week.",
    "Competitors are preparing products of their own.",
    "The design team worked on the project for two years.",
    "Customers can order online or by phone.",
    "Production takes place in three factories.",
];

const FACTS: &[(&str, &[&str])] = &[
    ("order number", &["4821", "7730", "1942", "5568", "3307"]),
    ("city", &["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi"]),
    (
        "favorite color",
        &["teal", "amber", "violet", "crimson", "olive"],
    ),
    ("booking code", &["QX7", "ZR2", "LM9", "TP4", "KD6"]),
    (
        "manager",
        &["Alvarez", "Okafor", "Lindqvist", "Tanaka", "Moreau"],
    ),
    ("team", &["Falcons", "Otters", "Comets", "Ravens", "Lynxes"]),
];

const SMALL_TALK: &[&str] = &[
    "Thanks for your help today.",
    "The weather is lovely here.",
    "I have a few questions.",
    "Sorry for the long message.",
];

fn summarize_task(rng: &mut Rng, id: usize) -> Value {
    let product = rng.pick(PRODUCTS);
    let (title_words, template) = POINTS[rng.below(POINTS.len())];
    let number = 10 + rng.below(490);
    let point = template
        .replace("{p}", product)
        .replace("{n}", &number.to_string());
    let mut sentences: Vec<String> = Vec::new();
    let fillers = 3 + rng.below(3);
    for _ in 0..fillers {
        let filler = rng.pick(FILLERS).to_owned();
        if !sentences.contains(&filler) {
            sentences.push(filler);
        }
    }
    // A sentence that names the product but not the point, so the title's product word alone
    // does not find the point.
    sentences.insert(
        rng.below(sentences.len() + 1),
        format!("The {product} comes in several colours."),
    );
    let at = if rng.below(4) == 0 {
        0
    } else {
        1 + rng.below(sentences.len())
    };
    sentences.insert(at, point.clone());
    json!({
        "id": format!("s-{id:04}"),
        "type": "summarize",
        "input": {"title": format!("{product} {title_words}"), "text": sentences.join(" ")},
        "reference": point,
    })
}

fn chat_task(rng: &mut Rng, id: usize) -> Value {
    let count = 1 + rng.below(4);
    let mut order: Vec<usize> = (0..FACTS.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut messages = Vec::new();
    let mut stated = Vec::new();
    for &fact in order.iter().take(count) {
        let (attribute, values) = FACTS[fact];
        let value = rng.pick(values);
        if rng.below(2) == 0 {
            messages.push(json!({"role": "user", "content": rng.pick(SMALL_TALK)}));
            messages.push(json!({"role": "assistant", "content": "Happy to help."}));
        }
        messages.push(json!({"role": "user", "content": format!("My {attribute} is {value}.")}));
        messages.push(json!({"role": "assistant", "content": "Noted."}));
        stated.push((attribute, value));
    }
    let (attribute, value) = stated[rng.below(stated.len())];
    messages.push(json!({"role": "user", "content": format!("What is my {attribute}?")}));
    json!({
        "id": format!("c-{id:04}"),
        "type": "chat",
        "input": {"messages": messages},
        "reference": value,
    })
}

/// `count` tasks from `seed`: the same arguments always give the same tasks.
pub fn generate(count: usize, seed: u64) -> Vec<Value> {
    let mut rng = Rng(plugin_api::assign::Random::new(seed));
    (0..count)
        .map(|i| {
            if rng.below(2) == 0 {
                summarize_task(&mut rng, i + 1)
            } else {
                chat_task(&mut rng, i + 1)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_mixed() {
        let a = generate(200, 7);
        assert_eq!(a, generate(200, 7));
        assert_ne!(a, generate(200, 8));
        let summarize = a.iter().filter(|t| t["type"] == "summarize").count();
        assert!((70..130).contains(&summarize), "{summarize}");
        assert!(a.iter().all(|t| t["reference"].is_string()));
    }
}
