package migrate

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// allowedDevices are the character devices a migrating process may hold:
// they mean the same on every node.
var allowedDevices = map[string]bool{
	"/dev/null": true, "/dev/zero": true, "/dev/urandom": true, "/dev/random": true, "/dev/full": true,
	"/dev/tty": true,
}

// Check says why the process pid (with its descendants, which migrate
// with it) cannot migrate, or "" if nothing known stops it. It looks at
// /proc only; CRIU may still refuse something this does not know.
func Check(pid int) string {
	return CheckAll([]int{pid})[pid]
}

// CheckAll is Check for several processes, reading the process table once.
// Processes with nothing against them are not in the map.
func CheckAll(pids []int) map[int]string {
	out := map[int]string{}
	if len(pids) == 0 {
		return out
	}
	children := childrenMap()
	for _, pid := range pids {
		if why := checkTree(pid, children); why != "" {
			out[pid] = why
		}
	}
	return out
}

func checkTree(pid int, children map[int][]int) string {
	tree := []int{pid}
	for i := 0; i < len(tree) && i < 4096; i++ {
		tree = append(tree, children[tree[i]]...)
	}
	for _, p := range tree {
		if why := checkOne(p); why != "" {
			if p != pid {
				return fmt.Sprintf("its child %d %s", p, why)
			}
			return why
		}
	}
	return ""
}

func checkOne(pid int) string {
	dir := "/proc/" + strconv.Itoa(pid)
	fds, err := os.ReadDir(dir + "/fd")
	if err != nil {
		return ""
	}
	var sockets map[string]bool
	for _, e := range fds {
		l, err := os.Readlink(dir + "/fd/" + e.Name())
		if err != nil {
			continue
		}
		why := fdReason(l)
		if why != "" {
			return why
		}
		if ino, ok := strings.CutPrefix(l, "socket:["); ok {
			if sockets == nil {
				sockets = map[string]bool{}
			}
			sockets[strings.TrimSuffix(ino, "]")] = true
		}
	}
	if len(sockets) > 0 {
		for _, f := range []string{"tcp", "tcp6"} {
			if c := establishedTCP(dir+"/net/"+f, sockets); c != "" {
				return "holds an established TCP connection (" + c + "): it would break on another node"
			}
		}
	}
	return ""
}

// fdReason classifies one fd's link target.
func fdReason(link string) string {
	switch {
	case link == "anon_inode:[userfaultfd]":
		return "uses userfaultfd (memory expansion): its pages are served by this node's pager"
	case strings.HasPrefix(link, "/dev/") && !allowedDevices[link] && !strings.HasPrefix(link, "/dev/pts/") &&
		!strings.HasPrefix(link, "/dev/shm/") && !strings.HasPrefix(link, "/dev/mqueue/"):
		if fi, err := os.Stat(link); err == nil && fi.Mode()&os.ModeDevice != 0 {
			return "uses device " + link + ", which is not on other nodes"
		}
	}
	return ""
}

// establishedTCP returns "local -> remote" of the first socket of inodes
// in state ESTABLISHED in a /proc/PID/net/tcp[6] table, or "".
func establishedTCP(table string, inodes map[string]bool) string {
	f, err := os.Open(table)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		if c := parseTCPLine(sc.Text(), inodes); c != "" {
			return c
		}
	}
	return ""
}

// parseTCPLine checks one line of /proc/net/tcp: "sl local rem st ... inode".
func parseTCPLine(line string, inodes map[string]bool) string {
	f := strings.Fields(line)
	if len(f) < 10 || f[3] != "01" || !inodes[f[9]] {
		return ""
	}
	return hexAddr(f[1]) + " -> " + hexAddr(f[2])
}

// hexAddr turns "0100007F:1F90" into "127.0.0.1:8080" (IPv4), or leaves
// an IPv6 address in hex with its decimal port.
func hexAddr(s string) string {
	a, p, ok := strings.Cut(s, ":")
	port, err := strconv.ParseUint(p, 16, 16)
	if !ok || err != nil {
		return s
	}
	if len(a) == 8 {
		v, err := strconv.ParseUint(a, 16, 32)
		if err == nil {
			return fmt.Sprintf("%d.%d.%d.%d:%d", v&0xff, v>>8&0xff, v>>16&0xff, v>>24, port)
		}
	}
	return fmt.Sprintf("[%s]:%d", a, port)
}

// childrenMap maps each process to its children.
func childrenMap() map[int][]int {
	children := map[int][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pp := ppid(n); pp > 0 {
			children[pp] = append(children[pp], n)
		}
	}
	return children
}

// ppid reads the parent of pid from /proc/PID/stat, or 0.
func ppid(pid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	return parsePPID(string(b))
}

// parsePPID returns field 4 of a /proc/PID/stat line (the command name may
// hold spaces and parentheses: fields count from the last ')').
func parsePPID(stat string) int {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.Atoi(f[1])
	return n
}

// ChildOf returns the first process whose parent is pid, or 0.
func ChildOf(pid int) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ppid(n) == pid {
			return n
		}
	}
	return 0
}

// InnerPID returns the innermost PID of pid (NSpid's last field): the PID
// the process sees itself as, and the one CRIU records.
func InnerPID(pid int) int {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return pid
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "NSpid:"); ok {
			fs := strings.Fields(v)
			if len(fs) > 0 {
				if n, err := strconv.Atoi(fs[len(fs)-1]); err == nil {
					return n
				}
			}
		}
	}
	return pid
}
