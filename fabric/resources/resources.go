// Package resources probes what this machine contributes to the cluster: CPUs, memory, load, disks and network interfaces.
package resources

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Disk is a mounted block device and its capacity.
type Disk struct {
	Device     string `json:"device"` // e.g. /dev/vda1
	Mountpoint string `json:"mountpoint"`
	FSType     string `json:"fstype"`
	TotalBytes uint64 `json:"total_bytes"`
	FreeBytes  uint64 `json:"free_bytes"` // available to unprivileged users (statfs Bavail)
}

// NIC is a non-loopback network interface.
type NIC struct {
	Name      string   `json:"name"`
	MAC       string   `json:"mac,omitempty"`
	MTU       int      `json:"mtu"`
	SpeedMbps int      `json:"speed_mbps,omitempty"` // from /sys/class/net/X/speed; 0 if unknown
	Up        bool     `json:"up"`
	Addrs     []string `json:"addrs,omitempty"` // CIDR strings
}

// Snapshot is what this machine contributes to the cluster at one instant.
type Snapshot struct {
	CPUs          int       `json:"cpus"`            // usable CPUs (sched affinity count)
	MemTotalBytes uint64    `json:"mem_total_bytes"` // MemTotal
	MemFreeBytes  uint64    `json:"mem_free_bytes"`  // MemAvailable
	Load1         float64   `json:"load1"`
	Load5         float64   `json:"load5"`
	Load15        float64   `json:"load15"`
	Procs         int       `json:"procs"` // total scheduling entities, from /proc/loadavg
	BootTime      time.Time `json:"boot_time"`
	Kernel        string    `json:"kernel"` // uname release
	Disks         []Disk    `json:"disks"`
	NICs          []NIC     `json:"nics"`
}

// Mount is one line of /proc/mounts, with octal escapes decoded.
type Mount struct {
	Device     string `json:"device"`
	Mountpoint string `json:"mountpoint"`
	FSType     string `json:"fstype"`
}

// Prober reads machine state. Root (default "/") prefixes every file read
// (proc/..., sys/...) and every statfs'd mountpoint, so tests can use a fake tree.
type Prober struct {
	Root string
}

// Probe probes the local machine with the default Prober.
func Probe() (Snapshot, error) { return Prober{}.Probe() }

func (p Prober) path(rel string) string {
	root := p.Root
	if root == "" {
		root = "/"
	}
	return filepath.Join(root, rel)
}

// Probe gathers a Snapshot. Missing or malformed proc files are errors;
// disks that cannot be statfs'd are skipped.
func (p Prober) Probe() (Snapshot, error) {
	var s Snapshot
	s.CPUs = cpuCount()

	f, err := os.Open(p.path("proc/meminfo"))
	if err != nil {
		return s, fmt.Errorf("resources: %w", err)
	}
	s.MemTotalBytes, s.MemFreeBytes, err = ParseMeminfo(f)
	f.Close()
	if err != nil {
		return s, err
	}

	b, err := os.ReadFile(p.path("proc/loadavg"))
	if err != nil {
		return s, fmt.Errorf("resources: %w", err)
	}
	if s.Load1, s.Load5, s.Load15, s.Procs, err = ParseLoadavg(string(b)); err != nil {
		return s, err
	}

	if f, err = os.Open(p.path("proc/stat")); err != nil {
		return s, fmt.Errorf("resources: %w", err)
	}
	s.BootTime, err = parseBtime(f)
	f.Close()
	if err != nil {
		return s, err
	}

	s.Kernel = p.kernel()

	if f, err = os.Open(p.path("proc/mounts")); err != nil {
		return s, fmt.Errorf("resources: %w", err)
	}
	mounts := ParseMounts(f)
	f.Close()
	s.Disks = p.disks(mounts)

	if s.NICs, err = p.nics(); err != nil {
		return s, err
	}
	return s, nil
}

func cpuCount() int {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err == nil {
		if n := set.Count(); n > 0 {
			return n
		}
	}
	return runtime.NumCPU()
}

func (p Prober) kernel() string {
	if b, err := os.ReadFile(p.path("proc/sys/kernel/osrelease")); err == nil {
		if k := strings.TrimSpace(string(b)); k != "" {
			return k
		}
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// ParseMeminfo returns MemTotal and MemAvailable (falling back to MemFree
// on kernels without MemAvailable) in bytes.
func ParseMeminfo(r io.Reader) (total, available uint64, err error) {
	vals := map[string]uint64{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		key, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || (key != "MemTotal" && key != "MemAvailable" && key != "MemFree") {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 || len(fields) > 2 || (len(fields) == 2 && fields[1] != "kB") {
			return 0, 0, fmt.Errorf("resources: /proc/meminfo: malformed %s line %q", key, sc.Text())
		}
		v, err := strconv.ParseUint(fields[0], 10, 64)
		if err != nil || v > math.MaxUint64/1024 {
			return 0, 0, fmt.Errorf("resources: /proc/meminfo: bad %s value %q", key, fields[0])
		}
		if len(fields) == 2 {
			v *= 1024
		}
		vals[key] = v
	}
	if err := sc.Err(); err != nil {
		return 0, 0, fmt.Errorf("resources: /proc/meminfo: %w", err)
	}
	total, ok := vals["MemTotal"]
	if !ok {
		return 0, 0, errors.New("resources: /proc/meminfo: no MemTotal line")
	}
	if available, ok = vals["MemAvailable"]; !ok {
		if available, ok = vals["MemFree"]; !ok {
			return 0, 0, errors.New("resources: /proc/meminfo: no MemAvailable or MemFree line")
		}
	}
	return total, available, nil
}

// ParseLoadavg parses /proc/loadavg ("0.08 0.04 0.01 1/83 2158"); procs is
// the total after the slash in the 4th field.
func ParseLoadavg(s string) (l1, l5, l15 float64, procs int, err error) {
	f := strings.Fields(s)
	if len(f) < 4 {
		return 0, 0, 0, 0, fmt.Errorf("resources: /proc/loadavg: want at least 4 fields, got %d", len(f))
	}
	var loads [3]float64
	for i := range loads {
		v, err := strconv.ParseFloat(f[i], 64)
		if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
			return 0, 0, 0, 0, fmt.Errorf("resources: /proc/loadavg: bad load average %q", f[i])
		}
		loads[i] = v
	}
	running, total, ok := strings.Cut(f[3], "/")
	if !ok {
		return 0, 0, 0, 0, fmt.Errorf("resources: /proc/loadavg: bad process field %q", f[3])
	}
	if _, err := strconv.ParseUint(running, 10, 31); err != nil {
		return 0, 0, 0, 0, fmt.Errorf("resources: /proc/loadavg: bad process field %q", f[3])
	}
	n, err := strconv.ParseUint(total, 10, 31)
	if err != nil {
		return 0, 0, 0, 0, fmt.Errorf("resources: /proc/loadavg: bad process field %q", f[3])
	}
	return loads[0], loads[1], loads[2], int(n), nil
}

// parseBtime extracts the boot time from /proc/stat.
func parseBtime(r io.Reader) (time.Time, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20) // cpu/intr lines can be long on big machines
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || f[0] != "btime" {
			continue
		}
		if len(f) != 2 {
			return time.Time{}, fmt.Errorf("resources: /proc/stat: malformed btime line %q", sc.Text())
		}
		sec, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil || sec <= 0 {
			return time.Time{}, fmt.Errorf("resources: /proc/stat: bad btime %q", f[1])
		}
		return time.Unix(sec, 0), nil
	}
	if err := sc.Err(); err != nil {
		return time.Time{}, fmt.Errorf("resources: /proc/stat: %w", err)
	}
	return time.Time{}, errors.New("resources: /proc/stat: no btime line")
}

// ParseMounts parses /proc/mounts, decoding octal escapes such as \040.
// Lines with fewer than three fields are skipped.
func ParseMounts(r io.Reader) []Mount {
	var out []Mount
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 {
			continue
		}
		out = append(out, Mount{Device: UnescapeMountField(f[0]), Mountpoint: UnescapeMountField(f[1]), FSType: UnescapeMountField(f[2])})
	}
	return out
}

// UnescapeMountField decodes the kernel's octal escapes (\040 for a space,
// \134 for a backslash...) in a field of /proc/mounts or
// /proc/self/mountinfo. Anything that is not a valid escape is kept as is.
func UnescapeMountField(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && s[i+1] >= '0' && s[i+1] <= '3' && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// disks keeps /dev/ devices (minus loop devices), one per device at its
// shortest mountpoint, and statfs's each, skipping failures.
func (p Prober) disks(mounts []Mount) []Disk {
	best := map[string]Mount{}
	for _, m := range mounts {
		if !strings.HasPrefix(m.Device, "/dev/") || strings.HasPrefix(m.Device, "/dev/loop") {
			continue
		}
		if old, ok := best[m.Device]; !ok || len(m.Mountpoint) < len(old.Mountpoint) {
			best[m.Device] = m
		}
	}
	disks := []Disk{}
	for _, m := range best {
		var st unix.Statfs_t
		if err := unix.Statfs(p.path(m.Mountpoint), &st); err != nil {
			continue
		}
		bs := uint64(st.Bsize)
		disks = append(disks, Disk{Device: m.Device, Mountpoint: m.Mountpoint, FSType: m.FSType,
			TotalBytes: st.Blocks * bs, FreeBytes: st.Bavail * bs})
	}
	sort.Slice(disks, func(i, j int) bool { return disks[i].Device < disks[j].Device })
	return disks
}

func (p Prober) nics() ([]NIC, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("resources: listing interfaces: %w", err)
	}
	nics := []NIC{}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		n := NIC{Name: ifc.Name, MAC: ifc.HardwareAddr.String(), MTU: ifc.MTU, Up: ifc.Flags&net.FlagUp != 0}
		if b, err := os.ReadFile(p.path(filepath.Join("sys/class/net", ifc.Name, "speed"))); err == nil {
			if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && v > 0 {
				n.SpeedMbps = v
			}
		}
		if addrs, err := ifc.Addrs(); err == nil {
			for _, a := range addrs {
				n.Addrs = append(n.Addrs, a.String())
			}
		}
		nics = append(nics, n)
	}
	return nics, nil
}
