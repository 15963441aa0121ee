// Package bench measures the cluster filesystem's throughput side by side
// with the same files read locally and with sshfs, what a user would use
// instead.
//
// Run starts a 2-node testbed cluster on loopback (agents n1 and n2, each
// exporting DATA_DIR/scratch as "scratch" and mounting the namespace at
// DATA_DIR/mnt) and measures, one path after the other, on n2's scratch
// directory:
//
//   - local:  n2's scratch directory, directly;
//   - onebox: the same directory through n1's mount, n1/mnt/n2/scratch;
//   - sshfs:  the same directory through sshfs over 127.0.0.1, served by a
//     private sshd that Run starts on a free port with a host key and an
//     authorized key generated into a temporary directory (sshd -f
//     /dev/null and ssh -F /dev/null: neither the system's sshd
//     configuration nor root's ~/.ssh is read or written). sshd, the sshfs
//     mount and the keys are removed afterwards.
//
// For every path: a sequential write of Size bytes in 1 MiB writes, fsync
// and close included; sync and a drop of the page cache (echo 3 >
// /proc/sys/vm/drop_caches); a sequential read of the file in 1 MiB reads,
// every block checked against what was written; then Files small files
// created one after the other (create, write 4 KiB, close; no fsync). The
// figures are MB/s (10^6 bytes per second) and files/s, and the ratios
// onebox/local and onebox/sshfs.
//
// Every wait is bounded and everything Run starts is stopped and removed on
// every path out, including a cancelled ctx (Ctrl-C).
package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/onebox-project/onebox/fabric/resources"
	"github.com/onebox-project/onebox/internal/sshd"
	"github.com/onebox-project/onebox/testbed"
)

// Defaults and bounds.
const (
	DefaultSize  = 256 << 20
	DefaultFiles = 2000
	// BlockSize is the size of every read and write of the sequential
	// phases.
	BlockSize = 1 << 20
	// SmallFileSize is the size of every small file.
	SmallFileSize = 4 << 10

	mountTimeout = 30 * time.Second
)

// Path names, in the order they are measured.
const (
	Local  = "local"
	Onebox = "onebox"
	SSHFS  = "sshfs"
)

// ErrNoSSHFS is returned when sshfs or sshd is missing.
var ErrNoSSHFS = errors.New("sshfs and an OpenSSH server are needed for the sshfs comparison: " +
	"apt-get install sshfs openssh-server (or use --no-sshfs to skip it)")

// Options of a run.
type Options struct {
	Size    int64  // bytes of the sequential file; default DefaultSize
	Files   int    // number of small files; default DefaultFiles
	NoSSHFS bool   // skip the sshfs column
	Binary  string // the onebox executable for the agents; default os.Executable
	// Log receives progress lines; may be nil.
	Log io.Writer
}

// Measure is what one path measured. Rates are 0 where Err is set.
type Measure struct {
	Name        string        `json:"name"`
	Path        string        `json:"path"`
	WriteMBps   float64       `json:"write_mbps"`
	ReadMBps    float64       `json:"read_mbps"`
	CreatesPerS float64       `json:"creates_per_s"`
	Write       time.Duration `json:"write"`
	Read        time.Duration `json:"read"`
	Creates     time.Duration `json:"creates"`
	Err         string        `json:"error,omitempty"`
}

// Ratios are the onebox figures divided by another path's; 0 where one of
// them is missing.
type Ratios struct {
	Write   float64 `json:"write"`
	Read    float64 `json:"read"`
	Creates float64 `json:"creates"`
}

// Result of a run.
type Result struct {
	Size     int64     `json:"size"`
	Files    int       `json:"files"`
	Measures []Measure `json:"measures"`
	// OneboxLocal and OneboxSSHFS are onebox/local and onebox/sshfs.
	OneboxLocal Ratios  `json:"onebox_local"`
	OneboxSSHFS *Ratios `json:"onebox_sshfs,omitempty"`
	// DropCaches is empty if the page cache was dropped before every read,
	// else why not.
	DropCaches string `json:"drop_caches,omitempty"`
	// ScratchFS is the file system type under n2's scratch directory.
	ScratchFS string `json:"scratch_fs"`
	// SSHFSVersion is what 'sshfs --version' says, if used.
	SSHFSVersion string `json:"sshfs_version,omitempty"`
	CPUs         int    `json:"cpus"`
}

// Measure returns the measure named name, or nil.
func (r *Result) Measure(name string) *Measure {
	for i := range r.Measures {
		if r.Measures[i].Name == name {
			return &r.Measures[i]
		}
	}
	return nil
}

// ratio is a/b, or 0 if either is missing.
func ratio(a, b float64) float64 {
	if a <= 0 || b <= 0 {
		return 0
	}
	return a / b
}

func ratios(a, b *Measure) Ratios {
	if a == nil || b == nil || a.Err != "" || b.Err != "" {
		return Ratios{}
	}
	return Ratios{ratio(a.WriteMBps, b.WriteMBps), ratio(a.ReadMBps, b.ReadMBps), ratio(a.CreatesPerS, b.CreatesPerS)}
}

// CheckSSHFS returns ErrNoSSHFS if a program the sshfs comparison needs is
// missing.
func CheckSSHFS() error {
	for _, p := range []string{"sshfs", "ssh", "ssh-keygen"} {
		if _, err := exec.LookPath(p); err != nil {
			return ErrNoSSHFS
		}
	}
	if sshd.Path() == "" || sftpServerPath() == "" {
		return ErrNoSSHFS
	}
	return nil
}

func sftpServerPath() string {
	for _, p := range []string{"/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/lib/ssh/sftp-server", "/usr/libexec/sftp-server"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// Run measures as the package comment says.
func Run(ctx context.Context, o Options) (_ *Result, err error) {
	if o.Size <= 0 {
		o.Size = DefaultSize
	}
	if o.Files <= 0 {
		o.Files = DefaultFiles
	}
	logf := func(format string, a ...any) {
		if o.Log != nil {
			fmt.Fprintf(o.Log, "bench: "+format+"\n", a...)
		}
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("bench fs needs root (the agents mount with FUSE; the page cache is dropped between write and read)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return nil, fmt.Errorf("bench fs needs /dev/fuse: %w", err)
	}
	if !o.NoSSHFS {
		if err := CheckSSHFS(); err != nil {
			return nil, err
		}
	}
	if o.Binary == "" {
		if o.Binary, err = os.Executable(); err != nil {
			return nil, err
		}
	}
	res := &Result{Size: o.Size, Files: o.Files, CPUs: runtimeCPUs()}

	logf("starting a 2-node testbed cluster on loopback")
	c, err := testbed.Start(ctx, testbed.Options{Nodes: 2, Binary: o.Binary, Logf: logf})
	if err != nil {
		return nil, err
	}
	defer func() {
		logf("stopping the cluster")
		if cerr := c.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	n1, n2 := c.Nodes[0], c.Nodes[1]
	scratch := filepath.Join(n2.DataDir, "scratch")
	remote := filepath.Join(n1.DataDir, "mnt", n2.Name, "scratch")
	res.ScratchFS = fsType(scratch)
	if err := waitFor(ctx, mountTimeout, "n1's mount to show "+remote, func() bool {
		fi, err := os.Stat(remote)
		return err == nil && fi.IsDir()
	}); err != nil {
		return nil, err
	}

	paths := []struct{ name, dir string }{
		{Local, filepath.Join(scratch, "bench-local")},
		{Onebox, filepath.Join(remote, "bench-onebox")},
	}
	if !o.NoSSHFS {
		s, err := startSSHFS(ctx, scratch, logf)
		if s != nil {
			defer s.Close(logf)
		}
		if err != nil {
			return nil, err
		}
		res.SSHFSVersion = s.version
		paths = append(paths, struct{ name, dir string }{SSHFS, filepath.Join(s.mnt, "bench-sshfs")})
	}

	block := make([]byte, BlockSize)
	if _, err := rand.Read(block); err != nil {
		return nil, err
	}
	for _, p := range paths {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		logf("measuring %s at %s", p.name, p.dir)
		m, drop, err := measure(ctx, p.name, p.dir, o, block, logf)
		if drop != "" && res.DropCaches == "" {
			res.DropCaches = drop
		}
		if ctx.Err() != nil { // interrupted: the path is not measured
			return res, ctx.Err()
		}
		if err != nil {
			m.Err = err.Error()
			logf("%s: %v", p.name, err)
		}
		res.Measures = append(res.Measures, m)
	}
	res.OneboxLocal = ratios(res.Measure(Onebox), res.Measure(Local))
	if !o.NoSSHFS {
		r := ratios(res.Measure(Onebox), res.Measure(SSHFS))
		res.OneboxSSHFS = &r
	}
	return res, nil
}

func runtimeCPUs() int {
	n := 0
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		n = bytes.Count(b, []byte("\nprocessor"))
		if bytes.HasPrefix(b, []byte("processor")) {
			n++
		}
	}
	return n
}

// phaseTimeout bounds one phase of one path: generous, but bounded, for a
// path that stops answering.
func phaseTimeout(bytes int64) time.Duration {
	return 60*time.Second + time.Duration(bytes/(1<<20))*time.Second
}

// bounded runs f in a goroutine and returns its error, or gives up when ctx
// ends or timeout passes (f may stay blocked in a system call until its
// mount goes away at cleanup).
func bounded(ctx context.Context, timeout time.Duration, what string, f func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- f(ctx) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("%s: timed out after %v", what, timeout)
		}
		return ctx.Err()
	}
}

// measure runs the three phases on dir, which it creates and removes.
func measure(ctx context.Context, name, dir string, o Options, block []byte, logf func(string, ...any)) (m Measure, dropErr string, err error) {
	m = Measure{Name: name, Path: dir}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return m, "", err
	}
	defer func() {
		// Not timed; bounded like the rest.
		_ = bounded(context.Background(), phaseTimeout(o.Size), "clean-up", func(context.Context) error { return os.RemoveAll(dir) })
	}()
	file := filepath.Join(dir, "seq")
	var d time.Duration
	if err := bounded(ctx, phaseTimeout(o.Size), name+" write", func(ctx context.Context) (err error) {
		d, err = writeSeq(ctx, file, o.Size, block)
		return err
	}); err != nil {
		return m, "", err
	}
	m.Write, m.WriteMBps = d, mbps(o.Size, d)
	logf("%s: write %s in %v: %.0f MB/s", name, sizeString(o.Size), d.Round(time.Millisecond), m.WriteMBps)

	syscall.Sync()
	if err := dropCaches(); err != nil {
		dropErr = err.Error()
	}
	if err := bounded(ctx, phaseTimeout(o.Size), name+" read", func(ctx context.Context) (err error) {
		d, err = readSeq(ctx, file, o.Size, block)
		return err
	}); err != nil {
		return m, dropErr, err
	}
	m.Read, m.ReadMBps = d, mbps(o.Size, d)
	logf("%s: read in %v: %.0f MB/s", name, d.Round(time.Millisecond), m.ReadMBps)

	small := block[:SmallFileSize]
	if err := bounded(ctx, phaseTimeout(int64(o.Files)*SmallFileSize)+time.Duration(o.Files)*10*time.Millisecond, name+" creates", func(ctx context.Context) (err error) {
		d, err = createFiles(ctx, filepath.Join(dir, "small"), o.Files, small)
		return err
	}); err != nil {
		return m, dropErr, err
	}
	m.Creates, m.CreatesPerS = d, float64(o.Files)/d.Seconds()
	logf("%s: %d creates in %v: %.0f files/s", name, o.Files, d.Round(time.Millisecond), m.CreatesPerS)
	return m, dropErr, nil
}

// stamp marks block i so that a misplaced block is detected on read.
func stamp(buf []byte, i int64) { binary.LittleEndian.PutUint64(buf, uint64(i)) }

func writeSeq(ctx context.Context, path string, size int64, block []byte) (time.Duration, error) {
	buf := append([]byte(nil), block...)
	start := time.Now()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	for off, i := int64(0), int64(0); off < size; i++ {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		n := min(int64(len(buf)), size-off)
		stamp(buf, i)
		if _, err := f.Write(buf[:n]); err != nil {
			return 0, err
		}
		off += n
	}
	if err := f.Sync(); err != nil {
		return 0, fmt.Errorf("fsync: %w", err)
	}
	if err := f.Close(); err != nil {
		return 0, fmt.Errorf("close: %w", err)
	}
	return time.Since(start), nil
}

func readSeq(ctx context.Context, path string, size int64, block []byte) (time.Duration, error) {
	want := append([]byte(nil), block...)
	buf := make([]byte, len(block))
	start := time.Now()
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var off int64
	for i := int64(0); ; i++ {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		n, err := io.ReadFull(f, buf)
		if n > 0 {
			stamp(want, i)
			if !bytes.Equal(buf[:n], want[:n]) {
				return 0, fmt.Errorf("read: block %d differs from what was written", i)
			}
			off += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return 0, err
		}
	}
	d := time.Since(start)
	if off != size {
		return 0, fmt.Errorf("read %d bytes, wrote %d", off, size)
	}
	return d, nil
}

func createFiles(ctx context.Context, dir string, n int, data []byte) (time.Duration, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	start := time.Now()
	for i := range n {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		f, err := os.OpenFile(filepath.Join(dir, "f"+strconv.Itoa(i)), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if err != nil {
			return 0, err
		}
		if _, err := f.Write(data); err != nil {
			f.Close()
			return 0, err
		}
		if err := f.Close(); err != nil {
			return 0, err
		}
	}
	return time.Since(start), nil
}

func dropCaches() error {
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0)
}

func mbps(n int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / 1e6 / d.Seconds()
}

func fsType(path string) string {
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		return "unknown"
	}
	switch uint32(st.Type) {
	case 0xEF53:
		return "ext4"
	case 0x01021994:
		return "tmpfs"
	case 0x58465342:
		return "xfs"
	case 0x9123683E:
		return "btrfs"
	case 0x794c7630:
		return "overlayfs"
	}
	return fmt.Sprintf("0x%x", uint32(st.Type))
}

// waitFor polls cond every 50 ms until it holds, ctx ends or timeout
// passes.
func waitFor(ctx context.Context, timeout time.Duration, what string, cond func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for !cond() {
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("timed out after %v waiting for %s", timeout, what)
			}
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// sshfsMount is a private sshd on 127.0.0.1 and an sshfs mount of one
// directory through it.
type sshfsMount struct {
	dir     string // temporary: the mount point
	mnt     string
	version string
	sshd    *sshd.Server
	sshfs   *exec.Cmd
	// sshfsDone is closed when sshfs exits.
	sshfsDone chan struct{}
}

func startSSHFS(ctx context.Context, export string, logf func(string, ...any)) (s *sshfsMount, err error) {
	s = &sshfsMount{}
	if s.dir, err = os.MkdirTemp("", "obx-sshfs"); err != nil {
		return nil, err
	}
	s.mnt = filepath.Join(s.dir, "mnt")
	if err := os.Mkdir(s.mnt, 0o755); err != nil {
		return s, err
	}
	if out, err := exec.CommandContext(ctx, "sshfs", "--version").CombinedOutput(); err == nil {
		s.version = versionLine(string(out))
	}
	if s.sshd, err = sshd.Start(ctx, mountTimeout, "Subsystem=sftp "+sftpServerPath()); err != nil {
		return s, err
	}
	addr, port, userKey := s.sshd.Addr, s.sshd.Port, s.sshd.UserKey
	logf("sshd listening on %s; mounting %s with sshfs at %s", addr, export, s.mnt)

	// -f: in the foreground, a child that cannot outlive us; -F /dev/null:
	// not root's ~/.ssh/config.
	var sshfsErr bytes.Buffer
	s.sshfs = exec.Command("sshfs", "-f", "-F", "/dev/null", "root@127.0.0.1:"+export, s.mnt,
		"-o", "IdentityFile="+userKey+",IdentitiesOnly=yes,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,"+
			"Port="+strconv.Itoa(port)+",BatchMode=yes,ServerAliveInterval=5,ServerAliveCountMax=3,LogLevel=ERROR")
	s.sshfs.Stdout, s.sshfs.Stderr = &sshfsErr, &sshfsErr
	s.sshfs.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.sshfs.Start(); err != nil {
		return s, fmt.Errorf("sshfs: %w", err)
	}
	s.sshfsDone = sshd.WaitChan(s.sshfs)
	if err := waitFor(ctx, mountTimeout, "the sshfs mount at "+s.mnt, func() bool {
		select {
		case <-s.sshfsDone:
			return true
		default:
		}
		return mounted(s.mnt)
	}); err != nil {
		return s, err
	}
	select {
	case <-s.sshfsDone:
		return s, fmt.Errorf("sshfs exited: %s", strings.TrimSpace(sshfsErr.String()))
	default:
	}
	return s, nil
}

// Close unmounts, stops sshfs and sshd and removes the temporary directory.
func (s *sshfsMount) Close(logf func(string, ...any)) {
	logf("unmounting sshfs and stopping sshd")
	if s.mnt != "" && mounted(s.mnt) {
		if err := syscall.Unmount(s.mnt, 0); err != nil {
			_ = syscall.Unmount(s.mnt, syscall.MNT_DETACH)
		}
	}
	sshd.Stop(s.sshfs, s.sshfsDone, syscall.SIGTERM)
	if s.mnt != "" && mounted(s.mnt) { // sshfs killed before its unmount
		_ = syscall.Unmount(s.mnt, syscall.MNT_DETACH)
	}
	if s.sshd != nil {
		s.sshd.Close()
	}
	if s.dir != "" && !mounted(s.mnt) {
		_ = os.RemoveAll(s.dir)
	}
}

// mounted tells whether path is a mount point, by /proc/self/mountinfo.
func mounted(path string) bool {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	return mountinfoHas(f, path)
}

// mountinfoHas tells whether mountinfo lists path as a mount point (field
// 5, with octal escapes).
func mountinfoHas(r io.Reader, path string) bool {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) > 4 && resources.UnescapeMountField(fs[4]) == path {
			return true
		}
	}
	return false
}

// versionLine picks sshfs's own line from 'sshfs --version', which also
// names fusermount and the FUSE library.
func versionLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for _, l := range lines {
		if strings.HasPrefix(strings.TrimSpace(l), "SSHFS version") {
			return strings.TrimSpace(l)
		}
	}
	return strings.TrimSpace(lines[0])
}

func sizeString(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return strconv.FormatInt(n>>30, 10) + "GiB"
	case n >= 1<<20 && n%(1<<20) == 0:
		return strconv.FormatInt(n>>20, 10) + "MiB"
	case n >= 1<<10 && n%(1<<10) == 0:
		return strconv.FormatInt(n>>10, 10) + "KiB"
	}
	return strconv.FormatInt(n, 10) + "B"
}

// FormatRatio formats a ratio as "1.53x", or "-" if it is missing.
func FormatRatio(r float64) string {
	if r <= 0 {
		return "-"
	}
	return strconv.FormatFloat(r, 'f', 2, 64) + "x"
}

// formatRate formats a rate with no decimals from 100 up, one below.
func formatRate(v float64, unit string) string {
	if v <= 0 {
		return "-"
	}
	if v >= 100 {
		return strconv.FormatFloat(v, 'f', 0, 64) + " " + unit
	}
	return strconv.FormatFloat(v, 'f', 1, 64) + " " + unit
}

// Targets of issue 5 for large sequential reads.
const (
	TargetReadVsLocal = 0.5
	TargetReadVsSSHFS = 1.5
)

func verdict(r, target float64) string {
	switch {
	case r <= 0:
		return "not measured"
	case r >= target:
		return "met"
	}
	return "missed"
}

// PrintTable writes r as a table with a footer saying what was measured.
func PrintTable(w io.Writer, r *Result) {
	fmt.Fprintf(w, "cluster filesystem throughput: %s sequential file, %d x %s creates; 2-node testbed on loopback, %d CPUs\n",
		sizeString(r.Size), r.Files, sizeString(SmallFileSize), r.CPUs)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "%-12s\tseq write\tseq read\tsmall creates\t\n", "path")
	for _, m := range r.Measures {
		if m.Err != "" {
			fmt.Fprintf(tw, "%-12s\t%s\t%s\t%s\t\n", m.Name, "error", "error", "error")
			continue
		}
		fmt.Fprintf(tw, "%-12s\t%s\t%s\t%s\t\n", m.Name, formatRate(m.WriteMBps, "MB/s"), formatRate(m.ReadMBps, "MB/s"), formatRate(m.CreatesPerS, "files/s"))
	}
	row := func(name string, q Ratios) {
		fmt.Fprintf(tw, "%-12s\t%s\t%s\t%s\t\n", name, FormatRatio(q.Write), FormatRatio(q.Read), FormatRatio(q.Creates))
	}
	row("onebox/local", r.OneboxLocal)
	if r.OneboxSSHFS != nil {
		row("onebox/sshfs", *r.OneboxSSHFS)
	}
	_ = tw.Flush()
	for _, m := range r.Measures {
		if m.Err != "" {
			fmt.Fprintf(w, "%s: %s\n", m.Name, m.Err)
		}
	}
	fmt.Fprintf(w, "target (issue 5), large sequential reads: onebox >= %.1fx local: %s", TargetReadVsLocal, verdict(r.OneboxLocal.Read, TargetReadVsLocal))
	if r.OneboxSSHFS != nil {
		fmt.Fprintf(w, "; onebox >= %.1fx sshfs: %s", TargetReadVsSSHFS, verdict(r.OneboxSSHFS.Read, TargetReadVsSSHFS))
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "local: n2's scratch directory (%s) directly; onebox: the same directory through n1's FUSE mount (n1/mnt/n2/scratch)", r.ScratchFS)
	if r.OneboxSSHFS != nil {
		fmt.Fprintf(w, ";\n  sshfs: the same directory through sshfs (%s, default options) to a private sshd on 127.0.0.1", r.SSHFSVersion)
	}
	fmt.Fprintln(w, ".")
	fmt.Fprintf(w, "seq write: %s in 1 MiB writes, fsync and close included; then sync and ", sizeString(r.Size))
	if r.DropCaches == "" {
		fmt.Fprintln(w, "page cache dropped (echo 3 > /proc/sys/vm/drop_caches);")
	} else {
		fmt.Fprintf(w, "page cache NOT dropped (%s): reads may come from memory;\n", r.DropCaches)
	}
	fmt.Fprintln(w, "  seq read: the file in 1 MiB reads, every block checked; small creates: create, write 4 KiB, close, one file after the other, no fsync.")
	fmt.Fprintln(w, "  MB/s = 10^6 bytes/s. Paths measured one after the other, each once; agents, sshd and the benchmark share the same CPUs.")
}
