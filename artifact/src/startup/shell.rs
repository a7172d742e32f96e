//! Reading commands the way a container starts them: shebang lines, `env` wrappers and
//! (a useful subset of) POSIX shell scripts — simple commands joined by `;`, `&&`, `||`,
//! `|`, newlines, with `exec`, variable assignments, `export`, `cd`, quoting and `$VAR`
//! expansion. Control flow is not evaluated: every simple command found is a candidate.

use std::collections::BTreeMap;

/// Longest shebang line the kernel reads (BINPRM_BUF_SIZE).
pub const SHEBANG_MAX: usize = 256;
/// Simple commands taken from one script.
const MAX_COMMANDS: usize = 64;
/// Tokens taken from one script.
const MAX_TOKENS: usize = 16 * 1024;

/// `#!interp [arg]` from the first bytes of a file: the kernel passes everything after
/// the interpreter as one argument.
pub fn parse_shebang(first: &[u8]) -> Option<(String, Option<String>)> {
    let rest = first.strip_prefix(b"#!")?;
    let line_end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
    let line = String::from_utf8_lossy(rest.get(..line_end)?);
    let line = line.trim_matches(|c| c == ' ' || c == '\t' || c == '\r');
    let (interp, arg) = match line.find([' ', '\t']) {
        Some(i) => (&line[..i], Some(line[i..].trim().to_string())),
        None => (line, None),
    };
    if interp.is_empty() {
        return None;
    }
    Some((interp.to_string(), arg.filter(|a| !a.is_empty())))
}

/// What `env [options] [NAME=value]... program args` runs: the program's argv and the
/// assignments. `-S` splits its string into words (as `#!/usr/bin/env -S` uses it).
pub fn parse_env_args(args: &[String]) -> (Vec<String>, Vec<(String, String)>) {
    let mut words: Vec<String> = Vec::new();
    for a in args {
        if let Some(s) = a.strip_prefix("-S") {
            let s = s.trim_start();
            words.extend(s.split_whitespace().map(str::to_string));
        } else {
            words.push(a.clone());
        }
    }
    let mut assigns = Vec::new();
    let mut i = 0;
    while let Some(w) = words.get(i) {
        if w == "--" {
            i += 1;
            break;
        } else if w == "-u" || w == "-C" || w == "--unset" || w == "--chdir" {
            i += 2;
        } else if w.starts_with('-') {
            i += 1;
        } else if let Some((k, v)) = assignment(w) {
            assigns.push((k, v));
            i += 1;
        } else {
            break;
        }
    }
    (
        words.get(i..).map(<[_]>::to_vec).unwrap_or_default(),
        assigns,
    )
}

/// `NAME=value` when `w` is a shell assignment.
pub fn assignment(w: &str) -> Option<(String, String)> {
    let (k, v) = w.split_once('=')?;
    let ok = !k.is_empty()
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(|c: char| c.is_ascii_digit());
    ok.then(|| (k.to_string(), v.to_string()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    /// `;`, `&&`, `||`, `|`, `&`, newline, `(`, `)`.
    Sep,
}

/// Splits a script into words and separators; quotes are removed, `$` kept for expansion
/// (single-quoted `$` is escaped as `\u{1}` so it is not expanded).
fn tokenize(s: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    let flush = |cur: &mut String, in_word: &mut bool, out: &mut Vec<Tok>| {
        if *in_word {
            out.push(Tok::Word(std::mem::take(cur)));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        if out.len() >= MAX_TOKENS {
            break;
        }
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    cur.push(if q == '$' { '\u{1}' } else { q });
                }
            }
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                cur.push(n);
                            }
                        }
                        q => cur.push(q),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(n) => {
                    in_word = true;
                    cur.push(n);
                }
            },
            '#' if !in_word => {
                for q in chars.by_ref() {
                    if q == '\n' {
                        break;
                    }
                }
                flush(&mut cur, &mut in_word, &mut out);
                out.push(Tok::Sep);
            }
            ' ' | '\t' | '\r' => flush(&mut cur, &mut in_word, &mut out),
            ';' | '&' | '|' | '\n' | '(' | ')' | '`' => {
                flush(&mut cur, &mut in_word, &mut out);
                if matches!(c, '&' | '|') && chars.peek() == Some(&c) {
                    chars.next();
                }
                out.push(Tok::Sep);
            }
            '<' | '>' => {
                // A redirection: drop it, its file descriptor number and its target word.
                if in_word && !cur.is_empty() && cur.chars().all(|c| c.is_ascii_digit()) {
                    cur.clear();
                    in_word = false;
                }
                flush(&mut cur, &mut in_word, &mut out);
                while matches!(chars.peek(), Some('>' | '&' | '<')) {
                    chars.next();
                }
                while matches!(chars.peek(), Some(' ' | '\t')) {
                    chars.next();
                }
                while chars
                    .peek()
                    .is_some_and(|c| !c.is_whitespace() && !";&|()".contains(*c))
                {
                    chars.next();
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    flush(&mut cur, &mut in_word, &mut out);
    out
}

/// One simple command of a script, after expansion.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Command {
    pub argv: Vec<String>,
    /// Prefixed by `exec`: the shell is replaced.
    pub exec: bool,
}

/// Everything a script is predicted to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Script {
    pub commands: Vec<Command>,
    /// Files read with `.` or `source`.
    pub sourced: Vec<String>,
    /// Directories changed to with `cd` (last one wins for later commands).
    pub cwd: Option<String>,
}

const KEYWORDS: &[&str] = &[
    "if", "then", "else", "elif", "fi", "do", "done", "while", "until", "{", "}", "!", "time",
    "in", "esac", ";;",
];
/// Builtins: nothing is executed from the file system.
const BUILTINS: &[&str] = &[
    ":", "true", "false", "echo", "printf", "set", "shift", "unset", "test", "[", "[[", "]]",
    "read", "exit", "return", "local", "trap", "umask", "ulimit", "wait", "eval", "alias",
    "readonly", "declare", "typeset", "getopts", "break", "continue", "let", "hash", "type",
    "shopt", "pwd",
];

/// Parses a script. `env` holds known variables (assignments in the script are added);
/// `args` are the positional parameters (`$1`…, `$@`).
pub fn parse_script(text: &str, env: &mut BTreeMap<String, String>, args: &[String]) -> Script {
    let toks = tokenize(text);
    let mut script = Script::default();
    let mut words: Vec<String> = Vec::new();
    let mut flush = |words: &mut Vec<String>, env: &mut BTreeMap<String, String>| {
        let ws = std::mem::take(words);
        if script.commands.len() < MAX_COMMANDS {
            simple_command(ws, env, args, &mut script);
        }
    };
    for t in toks {
        match t {
            Tok::Word(w) => words.push(w),
            Tok::Sep => flush(&mut words, env),
        }
    }
    flush(&mut words, env);
    script
}

fn simple_command(
    ws: Vec<String>,
    env: &mut BTreeMap<String, String>,
    args: &[String],
    script: &mut Script,
) {
    let mut it = ws.into_iter().peekable();
    // Control keywords start a command without being one.
    while it.peek().is_some_and(|w| KEYWORDS.contains(&w.as_str())) {
        it.next();
    }
    let Some(first) = it.peek().cloned() else {
        return;
    };
    // Loops, case arms and function definitions are not followed.
    if first == "for" || first == "case" || first.ends_with("()") || first == "function" {
        return;
    }
    let mut local = env.clone();
    let mut assigned = false;
    while let Some((k, v)) = it.peek().and_then(|w| assignment(w)) {
        let v = expand_word(&v, &local, args).join(" ");
        local.insert(k, v);
        it.next();
        assigned = true;
    }
    let mut argv: Vec<String> = Vec::new();
    for w in it {
        argv.extend(expand_word(&w, &local, args));
    }
    let mut exec = false;
    loop {
        match argv.first().map(String::as_str) {
            Some("exec") => {
                exec = true;
                argv.remove(0);
                while argv.first().is_some_and(|a| a.starts_with('-')) {
                    argv.remove(0);
                }
            }
            Some("command" | "nohup" | "builtin") => {
                argv.remove(0);
            }
            _ => break,
        }
    }
    let Some(cmd) = argv.first().cloned() else {
        // Assignments alone set shell variables.
        if assigned {
            *env = local;
        }
        return;
    };
    match cmd.as_str() {
        "export" => {
            for a in argv.iter().skip(1) {
                if let Some((k, v)) = assignment(a) {
                    env.insert(k, v);
                }
            }
        }
        "cd" => {
            if let Some(d) = argv.get(1) {
                script.cwd = Some(d.clone());
            }
        }
        "." | "source" => {
            if let Some(f) = argv.get(1) {
                script.sourced.push(f.clone());
            }
        }
        c if BUILTINS.contains(&c) => {}
        _ => script.commands.push(Command { argv, exec }),
    }
}

/// Expands `$VAR`, `${VAR}`, `${VAR:-default}`, `$1`…, `$@`/`$*` (into several words when
/// the word is exactly one of them). Unknown variables expand to nothing.
pub fn expand_word(w: &str, env: &BTreeMap<String, String>, args: &[String]) -> Vec<String> {
    if w == "$@" || w == "$*" || w == "${@}" {
        return args.to_vec();
    }
    let mut out = String::new();
    let cs: Vec<char> = w.chars().collect();
    let mut i = 0;
    while let Some(&c) = cs.get(i) {
        if c == '\u{1}' {
            out.push('$');
            i += 1;
            continue;
        }
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        i += 1;
        let (name, default) = if cs.get(i) == Some(&'{') {
            let end = cs[i..].iter().position(|&c| c == '}').map(|p| p + i);
            let Some(end) = end else {
                break;
            };
            let inner: String = cs[i + 1..end].iter().collect();
            i = end + 1;
            match inner.split_once(":-").or_else(|| inner.split_once('-')) {
                Some((n, d)) => (n.to_string(), Some(d.to_string())),
                None => (inner, None),
            }
        } else {
            let start = i;
            while cs
                .get(i)
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
            {
                i += 1;
                // Positional parameters are one digit.
                if cs[start].is_ascii_digit() {
                    break;
                }
            }
            (cs[start..i].iter().collect::<String>(), None)
        };
        let val = match name.parse::<usize>() {
            Ok(0) => Some("sh".to_string()),
            Ok(n) => args.get(n - 1).cloned(),
            Err(_) => env.get(&name).cloned(),
        };
        match val.filter(|v| !v.is_empty()).or(default) {
            Some(v) => out.push_str(&v),
            None if name.is_empty() => out.push('$'),
            None => {}
        }
    }
    if out.is_empty() && w.contains('$') {
        return Vec::new();
    }
    vec![out]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn shebangs() {
        assert_eq!(
            parse_shebang(b"#!/bin/sh\necho"),
            Some(("/bin/sh".into(), None))
        );
        assert_eq!(
            parse_shebang(b"#! /usr/bin/env  python3 -u \r\n"),
            Some(("/usr/bin/env".into(), Some("python3 -u".into())))
        );
        assert_eq!(parse_shebang(b"#!\n"), None);
        assert_eq!(parse_shebang(b"\x7fELF"), None);
    }

    #[test]
    fn env_wrapper() {
        let (argv, a) = parse_env_args(&s(&["-i", "A=1", "python3", "x.py"]));
        assert_eq!(argv, s(&["python3", "x.py"]));
        assert_eq!(a, vec![("A".into(), "1".into())]);
        let (argv, _) = parse_env_args(&s(&["-S node --max-old-space-size=100", "app.js"]));
        assert_eq!(argv, s(&["node", "--max-old-space-size=100", "app.js"]));
        let (argv, _) = parse_env_args(&s(&["-u", "X", "--", "ls"]));
        assert_eq!(argv, s(&["ls"]));
    }

    #[test]
    fn scripts_chains_exec_and_assignments() {
        let mut env = BTreeMap::new();
        env.insert("HOME".to_string(), "/root".to_string());
        let sc = parse_script(
            "set -e; export JAVA_HOME=/opt/jdk && cd /app && \
             FOO=bar exec \"$JAVA_HOME/bin/java\" -jar app.jar > /dev/null 2>&1",
            &mut env,
            &[],
        );
        assert_eq!(sc.commands.len(), 1);
        assert!(sc.commands[0].exec);
        assert_eq!(
            sc.commands[0].argv,
            s(&["/opt/jdk/bin/java", "-jar", "app.jar"])
        );
        assert_eq!(sc.cwd.as_deref(), Some("/app"));
        assert_eq!(env.get("JAVA_HOME").map(String::as_str), Some("/opt/jdk"));

        let sc = parse_script(
            "#!/bin/sh\n# comment\nif [ -n \"$X\" ]; then\n  echo hi\nfi\n. /etc/profile\nexec \"$@\"\n",
            &mut env,
            &s(&["nginx", "-g", "daemon off;"]),
        );
        assert_eq!(sc.sourced, s(&["/etc/profile"]));
        assert_eq!(sc.commands.len(), 1);
        assert_eq!(sc.commands[0].argv, s(&["nginx", "-g", "daemon off;"]));

        let sc = parse_script(
            "for f in a b; do run $f; done; grep x 'lit$x' | sort",
            &mut env,
            &[],
        );
        let firsts: Vec<_> = sc.commands.iter().map(|c| c.argv[0].clone()).collect();
        assert_eq!(firsts, s(&["run", "grep", "sort"]));
        assert_eq!(sc.commands[1].argv[2], "lit$x");
    }

    #[test]
    fn expansion() {
        let mut env = BTreeMap::new();
        env.insert("A".to_string(), "x".to_string());
        assert_eq!(expand_word("${A}/b$A", &env, &[]), s(&["x/bx"]));
        assert_eq!(expand_word("${NOPE:-/d}", &env, &[]), s(&["/d"]));
        assert_eq!(expand_word("$NOPE", &env, &[]), Vec::<String>::new());
        assert_eq!(expand_word("$1$2", &env, &s(&["p", "q"])), s(&["pq"]));
        assert_eq!(
            expand_word("${unterminated", &env, &[]),
            Vec::<String>::new()
        );
        assert_eq!(expand_word("5$", &env, &[]), s(&["5$"]));
    }
}
