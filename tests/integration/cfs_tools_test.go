package integration

import (
	"crypto/sha256"
	endian "encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/internal/testenv"
)

// Unmodified programs on n1 working in n2's export through n1's mount:
// tar, sha256sum, sqlite3, Python and git, each compared with the same
// work done on local files.
func TestCFSTools(t *testing.T) {
	t.Parallel()
	c, _ := startFSCluster(t)
	n1, n2 := c.Nodes[0], c.Nodes[1]
	remote := filepath.Join(mountOf(n1), n2.Name, "scratch") // n2's export, from n1
	local := filepath.Join(n2.DataDir, "scratch")            // the same directory on n2's disk

	t.Run("TarRoundTrip", func(t *testing.T) {
		src := t.TempDir()
		makeTree(t, src, 1000)
		dst := filepath.Join(remote, "tartree")
		must(t, os.Mkdir(dst, 0o755))
		start := time.Now()
		run(t, "", "sh", "-c", `tar -C "$1" -cf - . | tar -C "$2" -xpf -`, "sh", src, dst)
		back := t.TempDir()
		run(t, "", "sh", "-c", `tar -C "$1" -cf - . | tar -C "$2" -xpf -`, "sh", dst, back)
		t.Logf("tar of 1000 files into n2's export through n1's mount and back out: %v (information only)", time.Since(start).Round(time.Millisecond))
		want := treeListing(t, src)
		for name, dir := range map[string]string{"on n2's disk": filepath.Join(local, "tartree"), "through n1's mount": dst, "extracted back": back} {
			if got := treeListing(t, dir); got != want {
				t.Fatalf("tree %s differs from the original:\n%s", name, firstDiff(want, got))
			}
		}
	})

	t.Run("SHA256Of1GiB", func(t *testing.T) {
		const size = 1 << 30
		p := filepath.Join(local, "gib")
		want := writePattern(t, p, size)
		start := time.Now()
		out := run(t, "", "sha256sum", filepath.Join(remote, "gib"))
		t.Logf("sha256sum of 1 GiB through n1's mount of n2: %.0f MB/s (one run, information only)", size/1e6/time.Since(start).Seconds())
		if got := strings.Fields(out)[0]; got != want {
			t.Fatalf("sha256 through the mount %s, of the file written on n2 %s", got, want)
		}
		must(t, os.Remove(p))
	})

	t.Run("SQLite", func(t *testing.T) {
		_, err := exec.LookPath("sqlite3")
		testenv.NeedNoError(t, err, "sqlite3 not installed (scripts/deps.sh installs it)")
		db := filepath.Join(remote, "app.db")
		var sb strings.Builder
		sb.WriteString("CREATE TABLE kv(k INTEGER PRIMARY KEY, v TEXT, n INTEGER);\nBEGIN;\n")
		for i := range 5000 {
			fmt.Fprintf(&sb, "INSERT INTO kv(v, n) VALUES('value-%d', %d);\n", i, i*3)
		}
		sb.WriteString("COMMIT;\nCREATE INDEX kv_v ON kv(v);\n")
		sqlite(t, db, sb.String())
		// Many small transactions: journal created, fsynced, deleted.
		for i := range 50 {
			sqlite(t, db, fmt.Sprintf("UPDATE kv SET n = n + 1 WHERE k = %d;", i+1))
		}
		query := "SELECT count(*), sum(n), (SELECT v FROM kv WHERE v = 'value-4321') FROM kv;"
		const want = "5000|37492550|value-4321"
		if got := sqlite(t, db, query); got != want {
			t.Fatalf("query through n1's mount: %q, want %q", got, want)
		}
		if got := sqlite(t, filepath.Join(local, "app.db"), query); got != want {
			t.Fatalf("query on n2's disk: %q, want %q", got, want)
		}
		if got := sqlite(t, db, "PRAGMA integrity_check;"); got != "ok" {
			t.Fatalf("integrity_check: %q", got)
		}
		// And the other way round: n2 changes it, n1 reads (close-to-open).
		sqlite(t, filepath.Join(mountOf(n2), n2.Name, "scratch", "app.db"), "DELETE FROM kv WHERE k > 10;")
		if got := sqlite(t, db, "SELECT count(*) FROM kv;"); got != "10" {
			t.Fatalf("count through n1 after n2 deleted rows: %q, want 10", got)
		}
	})

	t.Run("Python", func(t *testing.T) {
		_, err := exec.LookPath("python3")
		testenv.NeedNoError(t, err, "python3 not installed (scripts/deps.sh installs it)")
		// Atomic replace through a temporary file, JSON, mmap, a tree copy
		// and a walk: what Python programs commonly do with files.
		script := `
import hashlib, json, mmap, os, shutil, sys, tempfile
d = sys.argv[1]
state = {"n": list(range(1000)), "s": "x" * 5000}
fd, tmp = tempfile.mkstemp(dir=d)
with os.fdopen(fd, "w") as f:
    json.dump(state, f)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, os.path.join(d, "state.json"))
with open(os.path.join(d, "state.json")) as f:
    assert json.load(f) == state
with open(os.path.join(d, "state.json"), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    assert m[:6] == b'{"n": ', m[:6]
    digest = hashlib.sha256(m).hexdigest()
os.makedirs(os.path.join(d, "tree", "a", "b"))
for i in range(100):
    with open(os.path.join(d, "tree", "a", "b", "f%d" % i), "w") as f:
        f.write("line %d\n" % i * (i + 1))
shutil.copytree(os.path.join(d, "tree"), os.path.join(d, "copy"))
n = sum(len(fs) for _, _, fs in os.walk(os.path.join(d, "copy")))
shutil.rmtree(os.path.join(d, "tree"))
print(digest, n, sorted(os.listdir(d)))
`
		dir := filepath.Join(remote, "py")
		must(t, os.Mkdir(dir, 0o755))
		out := run(t, "", "python3", "-c", script, dir)
		sum := sha256.New()
		b, err := os.ReadFile(filepath.Join(local, "py", "state.json"))
		must(t, err)
		sum.Write(b)
		if want := fmt.Sprintf("%x 100 ['copy', 'state.json']\n", sum.Sum(nil)); out != want {
			t.Fatalf("python through the mount printed %q, want %q", out, want)
		}
	})

	t.Run("Git", func(t *testing.T) {
		home := t.TempDir()
		git := func(dir string, args ...string) string {
			t.Helper()
			cmd := exec.Command("git", args...)
			cmd.Dir = dir
			cmd.Env = append(os.Environ(), "HOME="+home, "GIT_CONFIG_NOSYSTEM=1",
				"GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.invalid", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.invalid",
				"GIT_AUTHOR_DATE=2024-01-02T03:04:05Z", "GIT_COMMITTER_DATE=2024-01-02T03:04:05Z")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("git %s in %s: %v\n%s", strings.Join(args, " "), dir, err, out)
			}
			return strings.TrimSpace(string(out))
		}
		// The same history made in a local directory and in the export
		// through the mount must have the same commit ids.
		var heads []string
		for _, dir := range []string{filepath.Join(t.TempDir(), "repo"), filepath.Join(remote, "repo")} {
			must(t, os.Mkdir(dir, 0o755))
			git(dir, "init", "-q", "-b", "main")
			makeTree(t, filepath.Join(dir, "src"), 200)
			git(dir, "add", ".")
			git(dir, "commit", "-q", "-m", "first")
			must(t, os.WriteFile(filepath.Join(dir, "src", "d00", "f00000"), []byte("changed\n"), 0o644))
			must(t, os.Rename(filepath.Join(dir, "src", "d01"), filepath.Join(dir, "src", "moved")))
			git(dir, "add", "-A")
			git(dir, "commit", "-q", "-m", "second")
			git(dir, "gc", "-q") // packs, repacks, prunes: renames and unlinks
			heads = append(heads, git(dir, "rev-parse", "HEAD"))
			if got := git(dir, "fsck", "--no-progress"); got != "" {
				t.Fatalf("git fsck in %s: %s", dir, got)
			}
		}
		if heads[0] != heads[1] {
			t.Fatalf("HEAD in the export %s, locally %s", heads[1], heads[0])
		}
		// Clones: within the export (hard links), from it to local disk,
		// and from local disk into it.
		repo := filepath.Join(remote, "repo")
		for _, clone := range [][2]string{
			{repo, filepath.Join(remote, "clone-in")},
			{repo, filepath.Join(t.TempDir(), "clone-out")},
			{filepath.Join(t.TempDir(), "clone-out"), filepath.Join(remote, "clone-back")},
		} {
			if clone[0] != repo {
				git(t.TempDir(), "clone", "-q", repo, clone[0])
			}
			git(t.TempDir(), "clone", "-q", clone[0], clone[1])
			if got := git(clone[1], "log", "--format=%H %s"); got != heads[0]+" second\n"+git(repo, "rev-parse", "HEAD~1")+" first" {
				t.Fatalf("git log in %s: %q", clone[1], got)
			}
			if got := git(clone[1], "status", "--porcelain"); got != "" {
				t.Fatalf("git status in the fresh clone %s: %q", clone[1], got)
			}
		}
		// Seen on n2's disk, the repository is whole.
		if got := git(filepath.Join(local, "clone-in"), "fsck", "--no-progress"); got != "" {
			t.Fatalf("git fsck on n2's disk: %s", got)
		}
	})
}

// run runs a program and returns its stdout; a failure fails the test.
func run(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

func sqlite(t *testing.T, db, sql string) string {
	t.Helper()
	cmd := exec.Command("sqlite3", "-batch", "-bail", db)
	cmd.Stdin = strings.NewReader(sql)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("sqlite3 %s: %v\n%s", db, err, out)
	}
	return strings.TrimSpace(string(out))
}

// makeTree writes n files of varied sizes in nested directories, with
// symlinks, a hard link, an empty file and modes other than the usual.
func makeTree(t *testing.T, root string, n int) {
	t.Helper()
	for i := range n {
		dir := filepath.Join(root, fmt.Sprintf("d%02d", i%37), fmt.Sprintf("e%d", i%5))
		must(t, os.MkdirAll(dir, 0o755))
		b := make([]byte, i*131%20000)
		rand.NewChaCha8([32]byte{byte(i), byte(i >> 8)}).Read(b) // the same tree every time (git commit ids)
		must(t, os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%05d", i)), b, os.FileMode(0o600+i%3*0o40)))
	}
	must(t, os.MkdirAll(filepath.Join(root, "d00"), 0o755))
	must(t, os.WriteFile(filepath.Join(root, "d00", "f00000"), nil, 0o644))
	must(t, os.Symlink("e0/f00000", filepath.Join(root, "d00", "link")))
	must(t, os.Symlink("../nowhere", filepath.Join(root, "d00", "dangling")))
	must(t, os.Link(filepath.Join(root, "d01", "e1", "f00001"), filepath.Join(root, "d01", "hard")))
	must(t, os.Mkdir(filepath.Join(root, "empty-dir"), 0o700))
}

// treeListing is every entry of root with its type, mode, size, link
// target or contents checksum and link count (for files), sorted.
func treeListing(t *testing.T, root string) string {
	t.Helper()
	out := run(t, root, "find", ".", "-mindepth", "1", "-printf", `%p %y %m %s %l %n\n`)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	sums := run(t, root, "sh", "-c", `find . -type f -print0 | sort -z | xargs -0 sha256sum`)
	for i, l := range lines {
		f := strings.Fields(l)
		if f[1] == "d" { // a directory's size and link count depend on the file system
			lines[i] = f[0] + " d " + f[2]
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n") + "\n" + sums
}

func firstDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := range min(len(al), len(bl)) {
		if al[i] != bl[i] {
			return fmt.Sprintf("line %d: want %q, got %q", i+1, al[i], bl[i])
		}
	}
	return fmt.Sprintf("%d lines, want %d", len(bl), len(al))
}

// writePattern writes size bytes to p, fast and without holes: a 1 MiB
// block of bytes that are not all alike, every 8 bytes stamped with the
// block and word number so no two blocks are the same. It returns the
// hex SHA-256 of what it wrote.
func writePattern(t *testing.T, p string, size int) string {
	t.Helper()
	f, err := os.Create(p)
	must(t, err)
	defer f.Close()
	h := sha256.New()
	block := make([]byte, 1<<20)
	for n := 0; n < size; n += len(block) {
		for w := 0; w < len(block); w += 8 {
			endian.LittleEndian.PutUint64(block[w:], uint64(n+w)*0x9E3779B97F4A7C15)
		}
		if _, err := f.Write(block); err != nil {
			t.Fatal(err)
		}
		h.Write(block)
	}
	must(t, f.Close())
	return fmt.Sprintf("%x", h.Sum(nil))
}
