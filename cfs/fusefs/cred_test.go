package fusefs

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/onebox-project/onebox/internal/testenv"
)

func TestParseGroups(t *testing.T) {
	for _, tc := range []struct {
		status string
		want   []uint32
	}{
		{"Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1000 \nNStgid:\t1\n", []uint32{4, 24, 27, 1000}},
		{"Name:\tsh\nGroups:\t\nNStgid:\t1\n", nil},
		{"Name:\tsh\nGroups:\t4294967295\n", []uint32{4294967295}},
		{"Name:\tsh\nGroups:\t4 x\n", nil},
		{"Name:\tsh\nGroups:\t4294967296\n", nil},
		{"Name:\tsh\n", nil},
		{"", nil},
		{"Name:\tsh\nGroups:\t" + strings.Repeat("7 ", 300) + "\n", slices.Repeat([]uint32{7}, 256)},
	} {
		if got := parseGroups([]byte(tc.status)); !slices.Equal(got, tc.want) {
			t.Errorf("parseGroups(%q) = %v, want %v", tc.status, got, tc.want)
		}
	}
	if g := procGroups(uint32(os.Getpid())); g == nil && len(mustGroups(t)) > 0 {
		t.Errorf("procGroups of this process: none, getgroups says %v", mustGroups(t))
	}
}

func mustGroups(t *testing.T) []int {
	g, err := syscall.Getgroups()
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// Through the mount, a user reaches what a supplementary group allows:
// the node acts with the caller's groups, not only its user and group.
func TestMountSupplementaryGroups(t *testing.T) {
	needFUSE(t)
	_, err := exec.LookPath("setpriv")
	testenv.NeedNoError(t, err, "setpriv (util-linux) not installed")
	mnt := filepath.Join(t.TempDir(), "mnt")
	export, _ := mountOne(t, mnt)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Chmod(export, 0o755))
	g := filepath.Join(export, "g")
	must(os.Mkdir(g, 0o700))
	must(os.Chown(g, 0, 4242))
	must(os.Chmod(g, 0o770))
	as := func(groups string) error {
		args := []string{"--reuid=65534", "--regid=65534", "--clear-groups"}
		if groups != "" {
			args = []string{"--reuid=65534", "--regid=65534", "--groups=" + groups}
		}
		cmd := exec.Command("setpriv", append(args, "sh", "-c", "echo x > g/f && mkdir g/d && mv g/f g/d/f && rm -r g/d")...)
		cmd.Dir = filepath.Join(mnt, "a", "x") // the test's directories above are closed to others
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	if err := as(""); err == nil {
		t.Fatal("uid 65534 without group 4242 wrote in a 0770 directory of group 4242")
	}
	if err := as("4242"); err != nil {
		t.Fatalf("uid 65534 with supplementary group 4242: %v", err)
	}
}

// A request without the kernel's caller (never expected) acts as nobody
// on the owning node, not as root.
func TestCallerCredWithoutCaller(t *testing.T) {
	if c := callerCred(context.Background()); c.UID == 0 || c.GID == 0 || len(c.Groups) != 0 {
		t.Errorf("callerCred without a FUSE caller = %+v, want nobody", c)
	}
}
