//! Human and JSON output, and a spinner on stderr for long waits (only on
//! a terminal, never in `--json` mode).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub struct Output {
    pub json: bool,
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.clone(),
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| format!("{key}={}", cell(value)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

impl Output {
    /// One object: `key: value` lines, or its JSON.
    pub fn object(&self, value: &Value) {
        if self.json {
            println!("{value}");
            return;
        }
        match value.as_object() {
            Some(map) => {
                let width = map.keys().map(String::len).max().unwrap_or(0);
                for (key, value) in map {
                    println!("{key:width$}  {}", cell(value));
                }
            }
            None => println!("{}", cell(value)),
        }
    }

    /// A list as a table of `columns`, or its JSON.
    pub fn table(&self, value: &Value, columns: &[&str]) {
        if self.json {
            println!("{value}");
            return;
        }
        let rows: Vec<Vec<String>> = value
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|item| columns.iter().map(|column| cell(&item[*column])).collect())
                    .collect()
            })
            .unwrap_or_default();
        let widths: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(index, column)| {
                rows.iter()
                    .map(|row| row[index].len())
                    .chain([column.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<String>| {
            cells
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:width$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        println!(
            "{}",
            line(columns.iter().map(|c| c.to_uppercase()).collect())
        );
        for row in rows {
            println!("{}", line(row));
        }
    }

    /// A request with no body: a confirmation line (nothing in JSON mode).
    pub fn done(&self, value: &Value, message: &str) {
        if self.json {
            if !value.is_null() {
                println!("{value}");
            }
        } else {
            println!("{message}");
        }
    }

    pub fn note(&self, message: &str) {
        if !self.json {
            eprintln!("{message}");
        }
    }

    /// Rewrites one status line on stderr (terminals only).
    pub fn progress(&self, line: &str) {
        if !self.json && std::io::stderr().is_terminal() {
            eprint!("\r{line}\x1b[K");
            let _ = std::io::stderr().flush();
        }
    }

    /// Ends a [`Output::progress`] line.
    pub fn progress_done(&self) {
        if !self.json && std::io::stderr().is_terminal() {
            eprintln!();
        }
    }

    /// A spinner with `message` on stderr until [`Spinner::finish`].
    pub fn spinner(&self, message: &str) -> Spinner {
        let stop = Arc::new(AtomicBool::new(false));
        if self.json || !std::io::stderr().is_terminal() {
            return Spinner { stop, thread: None };
        }
        let (flag, message) = (stop.clone(), message.to_string());
        let thread = std::thread::spawn(move || {
            let frames = ['|', '/', '-', '\\'];
            let mut index = 0;
            while !flag.load(Ordering::SeqCst) {
                eprint!("\r{} {message}", frames[index % frames.len()]);
                let _ = std::io::stderr().flush();
                index += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            eprint!("\r{}\r", " ".repeat(message.len() + 2));
        });
        Spinner {
            stop,
            thread: Some(thread),
        }
    }
}

pub struct Spinner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
