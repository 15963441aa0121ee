package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// swap is the baseline's set-up: a swap file on local disk and a memory
// cgroup (v1, as on these machines) whose limit forces the workload to swap.
type swap struct {
	file, cgroup string
}

const cgroupRoot = "/sys/fs/cgroup/memory"

func setupSwap(dir string, size uint64) (*swap, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root (swapon, cgroups)")
	}
	if _, err := os.Stat(filepath.Join(cgroupRoot, "memory.limit_in_bytes")); err != nil {
		return nil, fmt.Errorf("no cgroup v1 memory controller at %s", cgroupRoot)
	}
	for _, t := range []string{"mkswap", "swapon", "swapoff"} {
		if _, err := exec.LookPath(t); err != nil {
			return nil, fmt.Errorf("%s not found (apt-get install util-linux)", t)
		}
	}
	// On the local disk (not tmpfs): the data directory's file system.
	base := "/var/tmp"
	s := &swap{file: filepath.Join(base, fmt.Sprintf("onebox-bench-swap-%d", os.Getpid())),
		cgroup: filepath.Join(cgroupRoot, fmt.Sprintf("onebox-bench-%d", os.Getpid()))}
	ok := false
	defer func() {
		if !ok {
			s.remove()
		}
	}()
	f, err := os.OpenFile(s.file, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 1<<20)
	for w := uint64(0); w < size; w += uint64(len(buf)) {
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return nil, err
		}
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	for _, argv := range [][]string{{"mkswap", s.file}, {"swapon", s.file}} {
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("%s: %v: %s", argv[0], err, bytes.TrimSpace(out))
		}
	}
	if err := os.Mkdir(s.cgroup, 0o755); err != nil {
		return nil, err
	}
	ok = true
	return s, nil
}

// remove undoes setupSwap (each step whatever happened before).
func (s *swap) remove() {
	if s.cgroup != "" {
		for i := 0; i < 50; i++ { // the last process may still be exiting
			if err := os.Remove(s.cgroup); err == nil || os.IsNotExist(err) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	exec.Command("swapoff", s.file).Run()
	os.Remove(s.file)
}

// runSwap runs memwork in the cgroup with a memory limit of limit bytes. It
// reports the pages swapped in meanwhile (the machine's pswpin: that swap
// was really used) and the cgroup's peak usage (that the limit held).
func (e *env) runSwap(ctx context.Context, s *swap, mode string, mib, n int, limit uint64) (measure, error) {
	if err := os.WriteFile(filepath.Join(s.cgroup, "memory.limit_in_bytes"), []byte(strconv.FormatUint(limit, 10)), 0o644); err != nil {
		return measure{}, fmt.Errorf("cgroup limit: %w", err)
	}
	peakFile := filepath.Join(s.cgroup, "memory.max_usage_in_bytes")
	os.WriteFile(peakFile, []byte("0"), 0o644) // reset the peak
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	procs := filepath.Join(s.cgroup, "cgroup.procs")
	cmd := exec.CommandContext(ctx, "sh", "-c", `echo $$ > "$1" && exec "$2" "$3" "$4" "$5"`, "sh",
		procs, e.memwork, mode, strconv.Itoa(mib), strconv.Itoa(n))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	in0 := vmstat("pswpin")
	out, err := cmd.Output()
	if err != nil {
		return measure{}, errorf("memwork %s under swap: %v: %s", mode, err, stderr.String())
	}
	m, err := parse(string(out))
	m.swapIns = vmstat("pswpin") - in0
	if b, err := os.ReadFile(peakFile); err == nil {
		m.peak, _ = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	}
	return m, err
}

// vmstat reads one counter of /proc/vmstat (0 if missing).
func vmstat(name string) uint64 {
	b, err := os.ReadFile("/proc/vmstat")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == name {
			v, _ := strconv.ParseUint(f[1], 10, 64)
			return v
		}
	}
	return 0
}
