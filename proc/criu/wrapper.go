package criu

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
)

// wrapperMark is in the shell wrapper scripts/install-criu.sh writes.
const wrapperMark = "Written by onebox scripts/install-criu.sh"

// unwrap returns the command line the install-criu.sh wrapper at path
// execs (its private loader, library path and CRIU), so that CRIU can be
// started without the shell: the wrapper forks twice to find its root,
// 3-5 ms per CRIU start, and a migration starts CRIU twice while the
// program is stopped. It returns nil for anything else, or when the
// command it finds does not report version.
func unwrap(path, version string) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	head := make([]byte, 4096)
	n, _ := f.Read(head)
	argv := parseWrapper(head[:n], path)
	if argv == nil {
		return nil
	}
	if _, err := os.Stat(argv[0]); err != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	b := Binary{Path: path, Argv: argv}
	out, err := b.Command(ctx, "--version").CombinedOutput()
	if v, _, _, ok := parseVersion(string(out)); err != nil || !ok || v != version {
		return nil
	}
	return argv
}

// parseWrapper reads the wrapper's exec line: words, double-quoted or not,
// where $root is the directory above the script's (resolved) one, $0 the
// script and "$@" the arguments, which it drops. Anything it does not
// know (another variable, a quote left open, no such line) gives nil.
func parseWrapper(script []byte, path string) []string {
	if !bytes.HasPrefix(script, []byte("#!/bin/sh\n")) || !bytes.Contains(script, []byte(wrapperMark)) {
		return nil
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil
	}
	root := filepath.Dir(filepath.Dir(real))
	sc := bufio.NewScanner(bytes.NewReader(script))
	for sc.Scan() {
		line, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "exec ")
		if !ok {
			continue
		}
		words, ok := shellWords(line)
		if !ok || len(words) < 2 || words[len(words)-1] != "$@" {
			return nil
		}
		var argv []string
		for _, w := range words[:len(words)-1] {
			w = strings.ReplaceAll(w, "$root", root)
			if w == "$0" {
				w = path
			}
			if strings.Contains(w, "$") {
				return nil
			}
			argv = append(argv, w)
		}
		return argv
	}
	return nil
}

// shellWords splits a line into words, with double quotes (no escapes).
func shellWords(s string) ([]string, bool) {
	var words []string
	var cur strings.Builder
	in, quoted := false, false
	for _, c := range s {
		switch {
		case c == '"':
			in, quoted = !in, true
		case (c == ' ' || c == '\t') && !in:
			if cur.Len() > 0 || quoted {
				words = append(words, cur.String())
			}
			cur.Reset()
			quoted = false
		case c == '\\' || c == '\'' || c == '`':
			return nil, false
		default:
			cur.WriteRune(c)
		}
	}
	if in {
		return nil, false
	}
	if cur.Len() > 0 || quoted {
		words = append(words, cur.String())
	}
	return words, true
}
