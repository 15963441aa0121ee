package criu

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestParseWrapper(t *testing.T) {
	dir := t.TempDir()
	root, err := filepath.EvalSymlinks(dir)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(root, "bin", "criu")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	const head = "#!/bin/sh\n# " + wrapperMark + ": runs Debian trixie's criu 4.1.1-1\n" +
		"root=$(cd \"$(dirname \"$(readlink -f \"$0\")\")/..\" && pwd) || exit 127\n"
	for _, tc := range []struct {
		name   string
		script string
		want   []string
	}{
		{"install-criu.sh", head + `exec "$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/usr/lib" --argv0 "$0" "$root/usr/sbin/criu" "$@"` + "\n",
			[]string{root + "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "--library-path", root + "/usr/lib/x86_64-linux-gnu:" + root + "/usr/lib", "--argv0", path, root + "/usr/sbin/criu"}},
		{"no mark", "#!/bin/sh\nexec \"$root/criu\" \"$@\"\n", nil},
		{"not sh", "#!/bin/bash\n# " + wrapperMark + "\nexec \"$root/criu\" \"$@\"\n", nil},
		{"no exec line", head, nil},
		{"other variable", head + `exec "$root/ld.so" "$HOME/criu" "$@"` + "\n", nil},
		{"no $@", head + `exec "$root/ld.so" "$root/criu"` + "\n", nil},
		{"open quote", head + `exec "$root/ld.so "$@"` + "\n", nil},
		{"single quotes", head + `exec '$root/ld.so' "$@"` + "\n", nil},
		{"backslash", head + `exec "$root/ld\.so" "$@"` + "\n", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := parseWrapper([]byte(tc.script), path); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %q\nwant %q", got, tc.want)
			}
		})
	}
}

// The installed CRIU, when it is the wrapper, runs without the shell and
// reports the same version.
func TestFindUnwraps(t *testing.T) {
	b, err := Find()
	if err != nil {
		t.Skipf("no CRIU: %v", err)
	}
	script, err := os.ReadFile(b.Path)
	if err != nil {
		t.Fatal(err)
	}
	if parseWrapper(script, b.Path) == nil {
		if len(b.Argv) != 0 {
			t.Fatalf("%s is no install-criu.sh wrapper, yet Argv is %q", b.Path, b.Argv)
		}
		t.Skipf("%s is not install-criu.sh's wrapper", b.Path)
	}
	if len(b.Argv) < 2 {
		t.Fatalf("Argv %q: the wrapper %s was not resolved", b.Argv, b.Path)
	}
	out, err := b.Command(t.Context(), "--version").CombinedOutput()
	if v, _, _, ok := parseVersion(string(out)); err != nil || !ok || v != b.Version {
		t.Fatalf("%q --version: %v %s", b.Exec(), err, out)
	}
}
