//! The shell analyzer never panics or loops on any script: a shebang parses to a non-empty interpreter word, a script to at most 64 commands that are neither empty nor shell builtins, env wrappers and assignments to valid names, and a word without `$` expands to itself.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use talaria_artifact::startup::shell::{
    SHEBANG_MAX, assignment, expand_word, parse_env_args, parse_script, parse_shebang,
};

/// Commands the analyzer handles itself or never follows (its builtins and wrappers).
const NOT_COMMANDS: &[&str] = &[
    "exec", "command", "nohup", "builtin", "export", "cd", ".", "source", ":", "true", "false",
    "echo", "printf", "set", "shift", "unset", "test", "[", "[[", "]]", "read", "exit", "return",
    "local", "trap", "umask", "ulimit", "wait", "eval", "alias", "readonly", "declare", "typeset",
    "getopts", "break", "continue", "let", "hash", "type", "shopt", "pwd",
];

fn valid_name(k: &str) -> bool {
    !k.is_empty()
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(|c: char| c.is_ascii_digit())
}

fuzz_target!(|data: &[u8]| {
    if let Some((interp, arg)) = parse_shebang(&data[..data.len().min(SHEBANG_MAX)]) {
        assert!(data.starts_with(b"#!"));
        assert!(!interp.is_empty() && !interp.contains([' ', '\t', '\n']));
        assert!(arg.is_none_or(|a| !a.is_empty() && !a.contains('\n')));
    }
    let text = String::from_utf8_lossy(data);

    let mut env = BTreeMap::from([
        ("HOME".to_string(), "/root".to_string()),
        ("PATH".to_string(), "/usr/bin:/bin".to_string()),
    ]);
    let args = vec!["first".to_string(), "second arg".to_string()];
    let script = parse_script(&text, &mut env, &args);
    assert!(script.commands.len() <= 64);
    for c in &script.commands {
        let cmd = c.argv.first().expect("a command has a name");
        assert!(
            !NOT_COMMANDS.contains(&cmd.as_str()),
            "{cmd:?} taken as a command"
        );
    }
    for k in env.keys() {
        assert!(valid_name(k), "assigned {k:?}");
    }

    let words: Vec<String> = text
        .split_whitespace()
        .take(256)
        .map(str::to_string)
        .collect();
    let (argv, assigns) = parse_env_args(&words);
    for (k, _) in &assigns {
        assert!(valid_name(k));
    }
    let expanded: Vec<String> = words
        .iter()
        .flat_map(|w| match w.strip_prefix("-S") {
            Some(s) => s.split_whitespace().map(str::to_string).collect(),
            None => vec![w.clone()],
        })
        .collect();
    assert!(
        expanded.ends_with(&argv),
        "env's argv is the tail of its words"
    );

    for w in &words {
        if let Some((k, v)) = assignment(w) {
            assert!(valid_name(&k));
            assert_eq!(format!("{k}={v}"), *w);
        }
        let out = expand_word(w, &env, &args);
        if !w.contains(['$', '\u{1}']) {
            assert_eq!(out, vec![w.clone()], "a word without $ expands to itself");
        }
    }
});
