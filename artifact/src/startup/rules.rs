//! Runtime knowledge, one small rule per runtime (`env`, shells, JVM, Python, Node), and
//! the system files most programs read at startup.

use std::collections::{HashSet, VecDeque};

use super::analyze::{Ctx, Exec, Hit, MAX_SCRIPT};
use super::shell;
use super::{FileClass, FileReader};
use crate::view::resolve::{basename, lexical_join, list_dir, parent};

/// Modules followed through imports/requires in one runtime rule.
const MAX_MODULES: usize = 256;

/// Which rule applies to a program, by its name as invoked and as resolved (busybox-style
/// links are named by `argv[0]`).
pub(super) fn rule_for(argv0: &str, resolved: &str) -> Option<&'static str> {
    let names = [basename(argv0), basename(resolved)];
    for n in names {
        let r = match n {
            "env" => Some("env"),
            "sh" | "bash" | "dash" | "ash" | "zsh" | "ksh" | "mksh" => Some("shell"),
            "java" => Some("jvm"),
            "node" | "nodejs" => Some("node"),
            "nginx" => Some("nginx"),
            n if n == "python" || (n.starts_with("python") && python_version(n).is_some()) => {
                Some("python")
            }
            _ => None,
        };
        if r.is_some() {
            return r;
        }
    }
    None
}

/// `(3, 11)` from `python3.11`; `(3, 0)` means "some python3" when no minor is named.
pub(super) fn python_version(name: &str) -> Option<(u32, Option<u32>)> {
    let v = name.strip_prefix("python")?;
    if v.is_empty() {
        return Some((3, None));
    }
    let (maj, min) = match v.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (v, None),
    };
    let maj = maj.parse().ok()?;
    let min = match min {
        Some(m) => Some(m.parse().ok()?),
        None => None,
    };
    Some((maj, min))
}

impl<R: FileReader> Ctx<'_, R> {
    pub(super) async fn runtime_rules(&mut self, hit: &Hit, x: &Exec) {
        let argv0 = x.argv.first().cloned().unwrap_or_default();
        match rule_for(&argv0, &hit.path) {
            Some("env") => self.rule_env(x),
            Some("shell") => self.rule_shell(x).await,
            Some("jvm") => {
                self.runtimes.insert("jvm");
                self.rule_jvm(hit, x).await
            }
            Some("python") => {
                self.runtimes.insert("python");
                self.rule_python(hit, x).await
            }
            Some("node") => {
                self.runtimes.insert("node");
                self.rule_node(x).await
            }
            Some("nginx") => self.rule_nginx(x).await,
            _ => {}
        }
    }

    /// `env [opts] [A=b] prog args`: runs `prog` from PATH with the assignments.
    fn rule_env(&mut self, x: &Exec) {
        let (argv, assigns) = shell::parse_env_args(x.argv.get(1..).unwrap_or_default());
        if argv.is_empty() {
            return;
        }
        let mut from = x.clone();
        from.env.extend(assigns);
        self.push_exec(&from, argv, "run by env".into(), true);
    }

    /// `sh -c 'script' [$0 args]` or `sh script args`: the commands the script runs.
    async fn rule_shell(&mut self, x: &Exec) {
        let args = x.argv.get(1..).unwrap_or_default();
        let mut i = 0;
        let mut text: Option<(String, Vec<String>, String)> = None;
        while let Some(a) = args.get(i) {
            if a == "-c" {
                let script = args.get(i + 1).cloned().unwrap_or_default();
                // After the script: $0, then $1...
                let pos = args.get(i + 3..).unwrap_or_default().to_vec();
                text = Some((script, pos, "sh -c script".into()));
                break;
            } else if a.starts_with('-') || a.starts_with('+') {
                // Combined flags such as `-ec` carry -c too.
                if a.starts_with('-') && a.len() > 2 && a.contains('c') && !a.starts_with("--") {
                    let script = args.get(i + 1).cloned().unwrap_or_default();
                    let pos = args.get(i + 3..).unwrap_or_default().to_vec();
                    text = Some((script, pos, "sh -c script".into()));
                    break;
                }
                i += 1;
            } else {
                match self.resolve_file(&x.cwd, a) {
                    Ok(h) => {
                        self.add(&h, FileClass::Entrypoint, "shell script");
                        if let Some(b) = self.read(&h, 0, MAX_SCRIPT).await {
                            let pos = args.get(i + 1..).unwrap_or_default().to_vec();
                            text = Some((
                                String::from_utf8_lossy(&b).to_string(),
                                pos,
                                format!("run by script {}", h.path),
                            ));
                        }
                    }
                    Err(e) => self.note(a, &format!("shell script: {e}")),
                }
                break;
            }
        }
        let Some((text, pos, why)) = text else {
            return;
        };
        let mut env = x.env.clone();
        let sc = shell::parse_script(&text, &mut env, &pos);
        let mut from = x.clone();
        from.env = env;
        if let Some(d) = &sc.cwd {
            from.cwd = lexical_join(&x.cwd, d);
        }
        for f in &sc.sourced {
            if let Some(h) = self.try_file(&from.cwd, f) {
                self.add(&h, FileClass::Entrypoint, &format!("sourced ({why})"));
            }
        }
        // Commands run in order; an exec'd one replaces the shell, so nothing after it runs.
        let mut cmds = Vec::new();
        for c in sc.commands {
            let exec = c.exec;
            cmds.push(c.argv);
            if exec {
                break;
            }
        }
        for argv in cmds.into_iter().rev() {
            self.push_exec(&from, argv, why.clone(), true);
        }
    }

    fn add_opt(&mut self, cwd: &str, path: &str, class: FileClass, why: &str) -> Option<Hit> {
        let h = self.try_file(cwd, path)?;
        self.add(&h, class, why);
        Some(h)
    }

    /// JVM: the runtime image files every start reads, libjvm and the app's jars.
    async fn rule_jvm(&mut self, java: &Hit, x: &Exec) {
        // <home>/bin/java
        let home = parent(parent(&java.path)).to_string();
        let why = format!("JVM startup ({home})");
        let rt = FileClass::Runtime;
        let mut libdir = format!("{home}/lib");
        for cand in [
            "lib",
            "jre/lib",
            "lib/amd64",
            "jre/lib/amd64",
            "lib/aarch64",
            "jre/lib/aarch64",
        ] {
            let d = format!("{home}/{cand}");
            if self
                .try_file("/", &format!("{d}/server/libjvm.so"))
                .is_some()
            {
                libdir = d;
                break;
            }
        }
        self.add_opt("/", &format!("{libdir}/jvm.cfg"), rt, &why);
        // jvm.cfg names the VM; `server` is the default everywhere it exists.
        let mut vm = None;
        for v in ["server", "client"] {
            if let Some(h) = self.try_file("/", &format!("{libdir}/{v}/libjvm.so")) {
                vm = Some((v, h));
                break;
            }
        }
        match vm {
            Some((v, h)) => {
                self.add(&h, FileClass::Library, &why);
                self.elf_closure(&h, "libjvm.so").await;
                self.add_opt(
                    "/",
                    &format!("{libdir}/{v}/classes.jsa"),
                    rt,
                    "JVM class data sharing archive",
                );
            }
            None => self.note(&home, "JVM without lib/server/libjvm.so"),
        }
        for lib in [
            "libjava.so",
            "libjimage.so",
            "libzip.so",
            "libnio.so",
            "libnet.so",
            "libverify.so",
            "libextnet.so",
            "libjsvml.so",
        ] {
            if let Some(h) = self.add_opt("/", &format!("{libdir}/{lib}"), FileClass::Library, &why)
            {
                self.elf_closure(&h, lib).await;
            }
        }
        for f in [
            format!("{libdir}/modules"),
            format!("{libdir}/rt.jar"),
            format!("{libdir}/tzdb.dat"),
            format!("{libdir}/security/cacerts"),
            format!("{libdir}/security/default.policy"),
            format!("{libdir}/security/java.security"),
            format!("{home}/conf/security/java.security"),
            format!("{home}/conf/security/java.policy"),
            format!("{home}/release"),
        ] {
            self.add_opt("/", &f, rt, &why);
        }
        // The application: -jar, or -cp/-classpath/--class-path (or CLASSPATH).
        let args = x.argv.get(1..).unwrap_or_default();
        let mut cp: Option<String> = None;
        let mut i = 0;
        while let Some(a) = args.get(i) {
            match a.as_str() {
                "-jar" => {
                    if let Some(j) = args.get(i + 1) {
                        match self.resolve_file(&x.cwd, j) {
                            Ok(h) => {
                                self.add(&h, rt, "application jar (-jar)");
                            }
                            Err(e) => self.note(j, &format!("-jar: {e}")),
                        }
                    }
                    break;
                }
                "-cp" | "-classpath" | "--class-path" => {
                    cp = args.get(i + 1).cloned();
                    i += 2;
                }
                a if a.starts_with("--class-path=") => {
                    cp = a.split_once('=').map(|(_, v)| v.to_string());
                    i += 1;
                }
                a if a.starts_with('-') => i += 1,
                _ => break, // the main class
            }
        }
        let cp = cp.or_else(|| x.env.get("CLASSPATH").cloned());
        for e in cp.iter().flat_map(|c| c.split(':')).take(256) {
            if let Some(dir) = e.strip_suffix("/*").or_else(|| (e == "*").then_some(".")) {
                let pat = lexical_join(&x.cwd, &format!("{dir}/*.jar"));
                for j in self.glob(&pat).into_iter().take(1024) {
                    self.add_opt("/", &j, rt, "class path jar");
                }
            } else if e.ends_with(".jar") || e.ends_with(".zip") {
                self.add_opt(&x.cwd, e, rt, "class path jar");
            }
        }
    }

    /// Python: the interpreter's startup modules, `.pth` files, the script and what it imports.
    async fn rule_python(&mut self, exe: &Hit, x: &Exec) {
        let argv0 = x.argv.first().map(|a| basename(a)).unwrap_or("");
        let prefix = parent(parent(&exe.path)).to_string();
        let mut ver = python_version(basename(&exe.path))
            .or_else(|| python_version(argv0))
            .and_then(|(a, b)| b.map(|b| (a, b)));
        if ver.is_none() {
            // Pick the installed pythonX.Y directory.
            let names = list_dir(self.view, &format!("{prefix}/lib"), 4096);
            ver = names
                .iter()
                .filter_map(|n| python_version(n).and_then(|(a, b)| b.map(|b| (a, b))))
                .max();
        }
        let Some((maj, min)) = ver else {
            self.note(&exe.path, "Python version not found (no lib/pythonX.Y)");
            return;
        };
        let stdlib = format!("{prefix}/lib/python{maj}.{min}");
        let tag = format!("cpython-{maj}{min}");
        let mut path = Vec::new();
        let args = x.argv.get(1..).unwrap_or_default();
        // Options: -m mod, -c cmd, -X/-W take a value; the first other word is the script.
        let mut script: Option<String> = None;
        let mut module: Option<String> = None;
        let mut code: Option<String> = None;
        let mut i = 0;
        while let Some(a) = args.get(i) {
            match a.as_str() {
                "-m" => {
                    module = args.get(i + 1).cloned();
                    break;
                }
                "-c" => {
                    code = args.get(i + 1).cloned();
                    break;
                }
                "-X" | "-W" | "--check-hash-based-pycs" => i += 2,
                "-" => break,
                a if a.starts_with('-') => i += 1,
                a => {
                    script = Some(a.to_string());
                    break;
                }
            }
        }
        let mut sources: VecDeque<(String, String, usize)> = VecDeque::new();
        match &script {
            Some(s) => match self.resolve_file(&x.cwd, s) {
                Ok(h) => {
                    self.add(&h, FileClass::Entrypoint, "python script");
                    path.push(parent(&h.path).to_string());
                    sources.push_back((h.path.clone(), String::new(), 0));
                }
                Err(e) => self.note(s, &format!("python script: {e}")),
            },
            None => path.push(x.cwd.clone()),
        }
        if let Some(pp) = x.env.get("PYTHONPATH") {
            path.extend(
                pp.split(':')
                    .filter(|p| !p.is_empty())
                    .map(|p| lexical_join(&x.cwd, p)),
            );
        }
        path.push(stdlib.clone());
        path.push(format!("{stdlib}/lib-dynload"));
        let mut site_dirs = vec![
            format!("{prefix}/local/lib/python{maj}.{min}/dist-packages"),
            format!("{prefix}/lib/python{maj}/dist-packages"),
            format!("{prefix}/lib/python{maj}.{min}/dist-packages"),
            format!("{stdlib}/site-packages"),
        ];
        site_dirs
            .retain(|d| self.view.lookup(d).is_some() || !list_dir(self.view, d, 1).is_empty());
        path.extend(site_dirs.iter().cloned());
        let mut py = PyModules {
            path,
            tag,
            triplet: self
                .abi
                .and_then(|(b, m)| super::elf::multiarch(m, b))
                .unwrap_or("x86_64-linux-gnu")
                .to_string(),
            // Python 3.11+ runs these from code frozen into the interpreter: no file is
            // read for them (nor for what they import at startup).
            done: if (maj, min) >= (3, 11) {
                FROZEN_311.iter().map(|m| m.to_string()).collect()
            } else {
                HashSet::new()
            },
        };
        let startup = [
            "encodings",
            "encodings.aliases",
            "encodings.utf_8",
            "codecs",
            "io",
            "abc",
            "site",
            "os",
            "stat",
            "_collections_abc",
            "posixpath",
            "genericpath",
            "_sitebuiltins",
            "sitecustomize",
            "usercustomize",
        ];
        for m in startup {
            self.py_module(&mut py, m, "Python startup module", &mut sources, true)
                .await;
        }
        // site reads every .pth file of the site directories.
        for d in &site_dirs {
            for p in self.glob(&format!("{d}/*.pth")).into_iter().take(256) {
                self.add_opt("/", &p, FileClass::Runtime, "site .pth file");
            }
        }
        if let Some(m) = module {
            self.py_module(&mut py, &m, "python -m module", &mut sources, false)
                .await;
        }
        if let Some(c) = code {
            for m in python_imports(&c, true) {
                self.py_module(&mut py, &m, "imported by python -c", &mut sources, false)
                    .await;
            }
        }
        // Imports, breadth first, bounded.
        let mut parsed = 0;
        while let Some((file, module, depth)) = sources.pop_front() {
            parsed += 1;
            if parsed > MAX_MODULES {
                self.note(&file, "too many Python modules; imports no longer followed");
                break;
            }
            let Some(h) = self.try_file("/", &file) else {
                continue;
            };
            let Some(b) = self.read(&h, 0, MAX_SCRIPT).await else {
                continue;
            };
            let text = String::from_utf8_lossy(&b).to_string();
            // Relative imports are relative to the module's package.
            let package = if file.ends_with("/__init__.py") {
                module.as_str()
            } else {
                module.rsplit_once('.').map(|(p, _)| p).unwrap_or("")
            };
            for m in python_imports(&text, depth == 0) {
                let Some(m) = absolute_module(&m, package) else {
                    continue;
                };
                self.py_module(
                    &mut py,
                    &m,
                    &format!("imported by {file}"),
                    &mut sources,
                    false,
                )
                .await;
            }
        }
    }

    /// Adds a module (each package level's `__init__`), preferring the cached bytecode the
    /// interpreter reads; queues its source for its own imports.
    async fn py_module(
        &mut self,
        py: &mut PyModules,
        name: &str,
        why: &str,
        sources: &mut VecDeque<(String, String, usize)>,
        optional: bool,
    ) {
        let parts: Vec<&str> = name.split('.').filter(|p| !p.is_empty()).collect();
        for n in 1..=parts.len() {
            let full = parts[..n].join(".");
            if !py.done.insert(full.clone()) || py.done.len() > MAX_MODULES * 4 {
                continue;
            }
            let rel = parts[..n].join("/");
            let mut found = false;
            for dir in py.path.clone() {
                let base = format!("{}/{rel}", dir.trim_end_matches('/'));
                let (src, cache_dir, stem) =
                    if self.view.lookup(&format!("{base}/__init__.py")).is_some() {
                        (
                            format!("{base}/__init__.py"),
                            base.clone(),
                            "__init__".to_string(),
                        )
                    } else {
                        (
                            format!("{base}.py"),
                            parent(&base).to_string(),
                            basename(&base).to_string(),
                        )
                    };
                let pyc = format!("{cache_dir}/__pycache__/{stem}.{}.pyc", py.tag);
                let src_hit = self.try_file("/", &src);
                if let Some(h) = self.try_file("/", &pyc) {
                    self.add(&h, FileClass::Runtime, why);
                    found = true;
                } else if let Some(h) = &src_hit {
                    self.add(h, FileClass::Runtime, why);
                    found = true;
                }
                if let Some(h) = src_hit {
                    found = true;
                    sources.push_back((h.path.clone(), full.clone(), 1));
                }
                if found {
                    break;
                }
                // Extension modules.
                for ext in [
                    format!("{base}.{}-{}.so", py.tag, py.triplet),
                    format!("{base}.abi3.so"),
                    format!("{base}.so"),
                ] {
                    if let Some(h) = self.try_file("/", &ext) {
                        self.add(&h, FileClass::Runtime, why);
                        self.elf_closure(&h, "Python extension module").await;
                        found = true;
                        break;
                    }
                }
                if found {
                    break;
                }
            }
            // Builtin and frozen modules have no file; only note what the app imports.
            if !found && !optional && n == parts.len() && why.starts_with("python -m") {
                self.note(name, "Python module not found on sys.path");
            }
            if !found {
                break;
            }
        }
    }

    /// Node: the entry script, package.json files and what it requires.
    async fn rule_node(&mut self, x: &Exec) {
        let args = x.argv.get(1..).unwrap_or_default();
        let mut entry = None;
        let mut pre = Vec::new();
        let mut i = 0;
        while let Some(a) = args.get(i) {
            match a.as_str() {
                "-r" | "--require" | "--import" => {
                    pre.extend(args.get(i + 1).cloned());
                    i += 2;
                }
                "-e" | "--eval" | "-p" | "--print" => break,
                a if a.starts_with('-') => i += 1,
                a => {
                    entry = Some(a.to_string());
                    break;
                }
            }
        }
        // Debian builds node with some builtins read from files at startup instead of
        // compiled in (configure --shared-builtin-*-path).
        for f in NODE_SHARED_BUILTINS {
            self.add_opt("/", f, FileClass::Runtime, "node shared builtin (Debian)");
        }
        let mut work: VecDeque<String> = VecDeque::new();
        if let Some(e) = &entry {
            match self.node_resolve(&x.cwd, e).await {
                Some(h) => {
                    self.add(&h, FileClass::Entrypoint, "node entry script");
                    work.push_back(h.path.clone());
                }
                None => self.note(e, "node entry script not found"),
            }
        }
        for r in pre {
            if let Some(h) = self.node_require(&x.cwd, &r).await {
                self.add(&h, FileClass::Runtime, "node --require");
                work.push_back(h.path.clone());
            }
        }
        let mut n = 0;
        let mut resolutions = 0usize;
        while let Some(file) = work.pop_front() {
            n += 1;
            if n > MAX_MODULES {
                self.note(&file, "too many Node modules; requires no longer followed");
                break;
            }
            // The nearest package.json decides the module type.
            let mut d = parent(&file).to_string();
            for _ in 0..64 {
                if self
                    .add_opt(
                        "/",
                        &format!("{}/package.json", d.trim_end_matches('/')),
                        FileClass::Runtime,
                        "package.json (module scope)",
                    )
                    .is_some()
                    || d == "/"
                {
                    break;
                }
                d = parent(&d).to_string();
            }
            if !(file.ends_with(".js") || file.ends_with(".mjs") || file.ends_with(".cjs")) {
                continue;
            }
            let Some(h) = self.try_file("/", &file) else {
                continue;
            };
            let Some(b) = self.read(&h, 0, MAX_SCRIPT).await else {
                continue;
            };
            let text = String::from_utf8_lossy(&b).to_string();
            for spec in js_requires(&text) {
                // Each bare specifier walks node_modules up the tree: bound the total.
                resolutions += 1;
                if resolutions > MAX_MODULES * 16 {
                    self.note(&file, "too many require() calls; no longer followed");
                    return;
                }
                if let Some(m) = self.node_require(parent(&file), &spec).await
                    && !self.has(&m.path)
                {
                    self.add(&m, FileClass::Runtime, &format!("required by {file}"));
                    work.push_back(m.path.clone());
                }
            }
        }
    }

    /// nginx: its configuration (`-c`, else the Debian default) with every `include`, and
    /// the dynamic modules it loads (`load_module`) with their ELF closure.
    async fn rule_nginx(&mut self, x: &Exec) {
        let args = x.argv.get(1..).unwrap_or_default();
        let mut prefix = NGINX_PREFIX.to_string();
        let mut conf = None;
        let mut i = 0;
        while let Some(a) = args.get(i) {
            match a.as_str() {
                "-c" => conf = args.get(i + 1).cloned(),
                "-p" => prefix = args.get(i + 1).cloned().unwrap_or(prefix),
                _ => {}
            }
            i += 1;
        }
        let conf = conf.unwrap_or_else(|| NGINX_CONF.to_string());
        let conf = lexical_join(&prefix, &conf);
        let mut work = VecDeque::from([conf.clone()]);
        let mut seen = HashSet::new();
        while let Some(p) = work.pop_front() {
            if seen.len() >= MAX_MODULES || !seen.insert(p.clone()) {
                continue;
            }
            let Some(h) = self.add_opt("/", &p, FileClass::Runtime, "nginx configuration") else {
                if p == conf {
                    self.note(&p, "nginx configuration not found");
                }
                continue;
            };
            let Some(b) = self.read(&h, 0, MAX_SCRIPT).await else {
                continue;
            };
            // Includes are relative to the main file's directory; modules to the prefix.
            for (directive, arg) in nginx_directives(&String::from_utf8_lossy(&b)) {
                match directive.as_str() {
                    "include" => {
                        let pat = lexical_join(parent(&conf), &arg);
                        let files = if arg.contains(['*', '?']) {
                            self.glob(&pat)
                        } else {
                            vec![pat]
                        };
                        work.extend(files.into_iter().take(MAX_MODULES));
                    }
                    "load_module" => {
                        let m = lexical_join(&prefix, &arg);
                        if let Some(h) =
                            self.add_opt("/", &m, FileClass::Library, "nginx load_module")
                        {
                            self.elf_closure(&h, "nginx module").await;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// A relative or absolute module path: the file, with an extension, or a directory's
    /// package.json `main` / index.js.
    async fn node_resolve(&mut self, dir: &str, spec: &str) -> Option<Hit> {
        let base = lexical_join(dir, spec);
        for ext in ["", ".js", ".mjs", ".cjs", ".json", ".node"] {
            if let Some(h) = self.try_file("/", &format!("{base}{ext}")) {
                return Some(h);
            }
        }
        if let Some(pj) = self.try_file("/", &format!("{base}/package.json")) {
            self.add(&pj, FileClass::Runtime, "package.json (main)");
            if let Some(b) = self.read(&pj, 0, 64 * 1024).await
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
                && let Some(main) = v.get("main").and_then(|m| m.as_str())
            {
                let m = lexical_join(&base, main);
                for ext in ["", ".js", ".json", "/index.js"] {
                    if let Some(h) = self.try_file("/", &format!("{m}{ext}")) {
                        return Some(h);
                    }
                }
            }
        }
        self.try_file("/", &format!("{base}/index.js"))
    }

    /// `require(spec)` from a file in `dir`: relative paths, else node_modules upwards.
    async fn node_require(&mut self, dir: &str, spec: &str) -> Option<Hit> {
        if spec.starts_with("node:") || spec.is_empty() {
            return None;
        }
        if spec.starts_with("./") || spec.starts_with("../") || spec.starts_with('/') {
            return self.node_resolve(dir, spec).await;
        }
        let mut d = dir.to_string();
        for _ in 0..64 {
            // (node_modules may exist only implicitly in the tar: just try the paths.)
            let cand = format!("{}/node_modules/{spec}", d.trim_end_matches('/'));
            if let Some(h) = self.node_resolve("/", &cand).await {
                return Some(h);
            }
            if d == "/" {
                break;
            }
            d = parent(&d).to_string();
        }
        None // a builtin such as `fs`, or missing
    }

    /// System files: NSS, users, name resolution, certificates, time zone, locale.
    pub(super) async fn system_files(&mut self) {
        let sys = FileClass::System;
        let glibc = self
            .loaded
            .iter()
            .any(|l| basename(l).starts_with("libc.so"));
        let jvm = self.runtimes.contains("jvm");
        if glibc || jvm {
            if let Some(h) =
                self.add_opt("/", "/etc/nsswitch.conf", sys, "NSS configuration (glibc)")
            {
                let services = match self.read(&h, 0, 64 * 1024).await {
                    Some(b) => nss_services(&String::from_utf8_lossy(&b)),
                    None => Vec::new(),
                };
                if let Some(abi) = self.abi {
                    for s in services {
                        let name = format!("libnss_{s}.so.2");
                        let dirs = self.ld_conf_dirs().await;
                        let mut cands: Vec<String> = dirs;
                        if let Some(t) = super::elf::multiarch(abi.1, abi.0) {
                            cands.push(format!("/lib/{t}"));
                            cands.push(format!("/usr/lib/{t}"));
                        }
                        cands.extend([
                            "/lib64".into(),
                            "/usr/lib64".into(),
                            "/lib".into(),
                            "/usr/lib".into(),
                        ]);
                        for d in cands {
                            if let Some(h) = self.add_opt(
                                "/",
                                &format!("{d}/{name}"),
                                FileClass::Library,
                                "NSS service library",
                            ) {
                                self.elf_closure(&h, "NSS module").await;
                                break;
                            }
                        }
                    }
                }
            }
            for f in [
                "/etc/host.conf",
                "/etc/hosts",
                "/etc/resolv.conf",
                "/etc/gai.conf",
            ] {
                self.add_opt(
                    "/",
                    f,
                    sys,
                    "user and name lookups (Kubernetes may mount its own hosts/resolv.conf)",
                );
            }
        }
        // The container runtime reads these to resolve the user and its groups, whatever
        // the program is.
        for f in ["/etc/passwd", "/etc/group"] {
            self.add_opt(
                "/",
                f,
                sys,
                "read by the container runtime (user and groups)",
            );
        }
        // Cyrus SASL loads every plugin of its plugin directory when initialized.
        let sasl = self
            .loaded
            .iter()
            .any(|l| basename(l).starts_with("libsasl2.so"));
        if sasl
            && let Some(abi) = self.abi
            && let Some(t) = super::elf::multiarch(abi.1, abi.0)
        {
            for p in self
                .glob(&format!("/usr/lib/{t}/sasl2/*.so*"))
                .into_iter()
                .take(64)
            {
                if let Some(h) = self.add_opt(
                    "/",
                    &p,
                    FileClass::Library,
                    "SASL plugin (loaded by libsasl2)",
                ) {
                    self.elf_closure(&h, "SASL plugin").await;
                }
            }
        }
        // TLS: OpenSSL/GnuTLS in the closure or a certificate file named by the env.
        let tls = self.loaded.iter().any(|l| {
            let b = basename(l);
            b.starts_with("libssl") || b.starts_with("libgnutls") || b.starts_with("libcrypto")
        });
        let cert_env = self.env.get("SSL_CERT_FILE").cloned();
        if let Some(f) = &cert_env {
            self.add_opt("/", f, sys, "SSL_CERT_FILE");
        }
        if tls {
            for f in [
                "/usr/lib/ssl/openssl.cnf",
                "/etc/ssl/openssl.cnf",
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ] {
                self.add_opt("/", f, sys, "TLS library configuration and CA certificates");
            }
        }
        // Time zone: TZ names a zoneinfo file; otherwise /etc/localtime.
        match self.env.get("TZ").cloned() {
            Some(tz) if !tz.is_empty() => {
                let tz = tz.trim_start_matches(':');
                let p = if tz.starts_with('/') {
                    tz.to_string()
                } else {
                    format!("/usr/share/zoneinfo/{tz}")
                };
                if self.add_opt("/", &p, sys, "zoneinfo for TZ").is_none() && tz.contains('/') {
                    self.note(tz, "TZ names a zone missing from /usr/share/zoneinfo");
                }
            }
            _ => {
                self.add_opt("/", "/etc/localtime", sys, "local time zone");
            }
        }
        // Locale: the first of LC_ALL, LC_CTYPE…, LANG that names a non-C locale.
        let locale = [
            "LC_ALL",
            "LC_CTYPE",
            "LC_MESSAGES",
            "LC_COLLATE",
            "LC_NUMERIC",
            "LC_TIME",
            "LANG",
        ]
        .iter()
        .filter_map(|k| self.env.get(*k).cloned())
        .find(|v| !v.is_empty() && v != "C" && v != "POSIX");
        if locale.is_some()
            && let Some(abi) = self.abi
            && let Some(t) = super::elf::multiarch(abi.1, abi.0)
        {
            // glibc's iconv (codec lookups of a UTF-8 locale) reads its module cache.
            self.add_opt(
                "/",
                &format!("/usr/lib/{t}/gconv/gconv-modules.cache"),
                sys,
                "iconv module cache (locale set)",
            );
        }
        if let Some(loc) = locale
            && self
                .add_opt("/", "/usr/lib/locale/locale-archive", sys, "locale archive")
                .is_none()
        {
            let norm = normalize_locale(&loc);
            for name in [loc.clone(), norm] {
                let dir = format!("/usr/lib/locale/{name}");
                let files = self.glob(&format!("{dir}/LC_*"));
                if files.is_empty() {
                    continue;
                }
                for f in files.into_iter().take(32) {
                    self.add_opt("/", &f, sys, "locale data");
                }
                break;
            }
        }
    }
}

/// Stdlib modules frozen into CPython 3.11+ (`Tools/build/freeze_modules.py`).
const FROZEN_311: &[&str] = &[
    "abc",
    "codecs",
    "io",
    "_collections_abc",
    "_sitebuiltins",
    "genericpath",
    "ntpath",
    "posixpath",
    "os",
    "site",
    "stat",
    "importlib",
    "importlib.util",
    "importlib.machinery",
    "runpy",
    "zipimport",
    "os.path",
];

struct PyModules {
    path: Vec<String>,
    tag: String,
    triplet: String,
    done: HashSet<String>,
}

/// Module names imported at module level (and in top-level `try`/`if` blocks); `all`
/// takes indented imports too (for the main script, whose functions are likely called).
/// Files Debian's node reads its shared builtins from.
const NODE_SHARED_BUILTINS: &[&str] = &[
    "/usr/share/nodejs/cjs-module-lexer/lexer.js",
    "/usr/share/nodejs/cjs-module-lexer/dist/lexer.js",
    "/usr/share/nodejs/undici/undici-fetch.js",
    "/usr/share/nodejs/acorn/dist/acorn.js",
    "/usr/share/nodejs/acorn-walk/dist/walk.js",
];

/// nginx's compiled-in prefix and configuration file on Debian (and nginx.org builds).
const NGINX_PREFIX: &str = "/usr/share/nginx";
const NGINX_CONF: &str = "/etc/nginx/nginx.conf";

/// `include` and `load_module` directives of an nginx configuration, with their argument
/// (comments and quotes stripped). Other directives are skipped.
pub(super) fn nginx_directives(conf: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in conf.lines() {
        let line = line.split('#').next().unwrap_or("");
        for stmt in line.split([';', '{', '}']) {
            let mut words = stmt.split_whitespace();
            let (Some(d), Some(arg)) = (words.next(), words.next()) else {
                continue;
            };
            if d == "include" || d == "load_module" {
                let arg = arg.trim_matches(['"', '\'']);
                if !arg.is_empty() && out.len() < 1024 {
                    out.push((d.to_string(), arg.to_string()));
                }
            }
        }
    }
    out
}

pub(super) fn python_imports(src: &str, all: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut block_ok = true;
    for line in src.lines().take(20_000) {
        let indent = line.len() - line.trim_start().len();
        let l = line.trim();
        if indent == 0 && !l.is_empty() && !l.starts_with('#') {
            // Module-level blocks run at import, except the `__main__` one.
            block_ok = l.starts_with("try")
                || l.starts_with("except")
                || l.starts_with("else")
                || (l.starts_with("if ") && !l.contains("__name__"))
                || l.starts_with("import ")
                || l.starts_with("from ");
        }
        if indent > 0 && !(all || block_ok) {
            continue;
        }
        if let Some(rest) = l.strip_prefix("import ") {
            for part in rest.split(',') {
                let m = part.split_whitespace().next().unwrap_or("");
                if is_module_name(m) {
                    out.push(m.to_string());
                }
            }
        } else if let Some(rest) = l.strip_prefix("from ") {
            let m = rest.split_whitespace().next().unwrap_or("");
            let rel = m.trim_start_matches('.');
            if is_module_name(m) || (m.starts_with('.') && (rel.is_empty() || is_module_name(rel)))
            {
                if !rel.is_empty() {
                    out.push(m.to_string());
                }
                // `from pkg import name`: name may be a submodule (tried, not required).
                if let Some((_, names)) = rest.split_once(" import ") {
                    for n in names.split(',') {
                        let n = n.trim_matches(|c: char| c == '(' || c == ')' || c.is_whitespace());
                        let n = n.split_whitespace().next().unwrap_or("");
                        if is_module_name(n) && !n.contains('.') {
                            // `from . import x` names the sibling module `.x`.
                            out.push(if rel.is_empty() {
                                format!("{m}{n}")
                            } else {
                                format!("{m}.{n}")
                            });
                        }
                    }
                }
            }
        }
        if out.len() >= MAX_MODULES {
            break;
        }
    }
    out
}

/// `..x.y` imported from `package` → the absolute module name (`None` when the dots climb
/// above the top-level package).
pub(super) fn absolute_module(m: &str, package: &str) -> Option<String> {
    let rest = m.trim_start_matches('.');
    let dots = m.len() - rest.len();
    if dots == 0 {
        return Some(m.to_string());
    }
    let mut base: Vec<&str> = package.split('.').filter(|p| !p.is_empty()).collect();
    for _ in 1..dots {
        base.pop()?;
    }
    if base.is_empty() {
        return None;
    }
    if !rest.is_empty() {
        base.push(rest);
    }
    Some(base.join("."))
}

fn is_module_name(m: &str) -> bool {
    !m.is_empty()
        && !m.starts_with('.')
        && m.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Specifiers of `require('x')`, `import ... from 'x'`, `import 'x'`, `import('x')`.
pub(super) fn js_requires(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = src.as_bytes();
    for pat in ["require(", "from ", "import(", "import "] {
        let mut start = 0;
        while let Some(p) = src.get(start..).and_then(|s| s.find(pat)) {
            let at = start + p + pat.len();
            start = at;
            let rest = &b[at..];
            let ws = rest.iter().take_while(|c| c.is_ascii_whitespace()).count();
            let Some(&q) = rest.get(ws) else { break };
            if q != b'\'' && q != b'"' && q != b'`' {
                continue;
            }
            let body = &rest[ws + 1..];
            let Some(end) = body.iter().take(512).position(|&c| c == q) else {
                continue;
            };
            if let Ok(s) = std::str::from_utf8(&body[..end]) {
                out.push(s.to_string());
            }
            if out.len() >= MAX_MODULES {
                return out;
            }
        }
    }
    out
}

/// Service names of the passwd, group and hosts databases.
pub(super) fn nss_services(conf: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in conf.lines() {
        let line = line.split('#').next().unwrap_or("");
        let Some((db, rest)) = line.split_once(':') else {
            continue;
        };
        if !matches!(db.trim(), "passwd" | "group" | "hosts" | "shadow") {
            continue;
        }
        for w in rest.split_whitespace() {
            if w.starts_with('[') || !w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            if !out.iter().any(|o| o == w) {
                out.push(w.to_string());
            }
        }
    }
    out
}

/// `en_US.UTF-8` → `en_US.utf8` (glibc's normalized codeset).
pub(super) fn normalize_locale(l: &str) -> String {
    match l.split_once('.') {
        Some((lang, rest)) => {
            let (cs, modifier) = match rest.split_once('@') {
                Some((c, m)) => (c, Some(m)),
                None => (rest, None),
            };
            let cs: String = cs
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .map(|c| c.to_ascii_lowercase())
                .collect();
            match modifier {
                Some(m) => format!("{lang}.{cs}@{m}"),
                None => format!("{lang}.{cs}"),
            }
        }
        None => l.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_by_name() {
        assert_eq!(rule_for("sh", "/bin/busybox"), Some("shell"));
        assert_eq!(
            rule_for("/usr/bin/python3", "/usr/bin/python3.11"),
            Some("python")
        );
        assert_eq!(rule_for("java", "/opt/jdk/bin/java"), Some("jvm"));
        assert_eq!(rule_for("app", "/usr/bin/node"), Some("node"));
        assert_eq!(rule_for("pythonista", "/x"), None);
        assert_eq!(python_version("python3.12"), Some((3, Some(12))));
    }

    #[test]
    fn python_import_scan() {
        let src = "import os, sys as s\nfrom json import dumps\nfrom . import x\ntry:\n    import yaml\nexcept ImportError:\n    yaml = None\ndef f():\n    import lazy\n";
        assert_eq!(
            python_imports(src, false),
            ["os", "sys", "json", "json.dumps", ".x", "yaml"]
        );
        assert!(python_imports(src, true).contains(&"lazy".to_string()));
        let rel = "from .decoder import JSONDecoder\nfrom . import _parser, _compiler\n";
        assert_eq!(
            python_imports(rel, false),
            [".decoder", ".decoder.JSONDecoder", "._parser", "._compiler"]
        );
        assert_eq!(
            absolute_module(".decoder", "json").as_deref(),
            Some("json.decoder")
        );
        assert_eq!(absolute_module("..x", "a.b").as_deref(), Some("a.x"));
        assert_eq!(absolute_module(".x", ""), None);
        assert_eq!(absolute_module("...x", "a"), None);
        assert_eq!(absolute_module("os", "a").as_deref(), Some("os"));
    }

    #[test]
    fn js_scan() {
        let src = "const a = require('./a');\nimport b from \"lib/b\";\nimport './side.js';\nconst c = await import(`./c.mjs`);\nrequire(x);";
        let r = js_requires(src);
        for want in ["./a", "lib/b", "./side.js", "./c.mjs"] {
            assert!(r.contains(&want.to_string()), "{want} in {r:?}");
        }
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn nginx_scan() {
        let conf = "user www-data;\nload_module modules/ngx_stream.so; # x\nhttp {\n  include /etc/nginx/mime.types;\n  include \"conf.d/*.conf\";\n  # include nope;\n}\n";
        assert_eq!(
            nginx_directives(conf),
            vec![
                (
                    "load_module".to_string(),
                    "modules/ngx_stream.so".to_string()
                ),
                ("include".to_string(), "/etc/nginx/mime.types".to_string()),
                ("include".to_string(), "conf.d/*.conf".to_string()),
            ]
        );
    }

    #[test]
    fn nss_and_locale() {
        let conf = "passwd: files systemd\ngroup: files [SUCCESS=merge] sss\nhosts: files dns myhostname\nnetgroup: nis\n";
        assert_eq!(
            nss_services(conf),
            ["files", "systemd", "sss", "dns", "myhostname"]
        );
        assert_eq!(normalize_locale("en_US.UTF-8"), "en_US.utf8");
        assert_eq!(
            normalize_locale("de_DE.ISO-8859-1@euro"),
            "de_DE.iso88591@euro"
        );
        assert_eq!(normalize_locale("C"), "C");
    }
}
