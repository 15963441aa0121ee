// Package migrate moves a running process between nodes with CRIU,
// post-copy: the source dumps everything but the memory (criu dump
// --lazy-pages), the image files travel to the target, the target restores
// the process at once (criu restore --lazy-pages) and its pages follow on
// demand and in the background from the source's CRIU page server. No CRIU
// socket listens on any address: both CRIU ends get one end of a unix
// socketpair (--ps-socket), and the agents carry the bytes between them as
// frames of the members-only, mutual-TLS process protocol (proc/stream).
//
// This package holds what both ends share: the session's messages, the
// checks that refuse what cannot migrate, the page tunnel, the image file
// transfer, and the holder process that runs a restore and reports the
// restored program's exit status.
package migrate

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/onebox-project/onebox/proc/stream"
)

// Spec is the Migrate frame: what the target must restore.
type Spec struct {
	GID      string    `json:"gid"`
	Home     string    `json:"home"`
	Argv     []string  `json:"argv"`
	Started  time.Time `json:"started"`
	Detached bool      `json:"detached"`
	Balance  bool      `json:"balance"`
	From     string    `json:"from"`
	Reason   string    `json:"reason"`
	// Stdio are the inherit keys of the program's fds 0, 1, 2 on the
	// source ("pipe:[123]", or a file path without its leading slash):
	// the target hands its own pipes (or log file) in their place.
	Stdio [3]string `json:"stdio"`
	// PID is the program's PID as CRIU records it (in its own PID
	// namespace): restored as is where it is free.
	PID int `json:"pid"`
	// Checkpoint: a plain (not lazy) restore from complete images.
	Checkpoint bool `json:"checkpoint,omitempty"`
}

// Validate checks a Spec from the wire.
func (s *Spec) Validate() error {
	switch {
	case !validGID(s.GID):
		return fmt.Errorf("migrate: bad process id %q", s.GID)
	case len(s.Argv) == 0 || len(s.Argv) > stream.MaxArgs:
		return errors.New("migrate: bad command")
	case s.PID <= 0 || s.PID > 1<<22:
		return fmt.Errorf("migrate: bad pid %d", s.PID)
	}
	for _, k := range s.Stdio {
		if k == "" || strings.ContainsAny(k, "\x00\n") || len(k) > 4096 {
			return fmt.Errorf("migrate: bad stdio key %q", k)
		}
	}
	return nil
}

// validGID: "g" and 12 lowercase hex digits (the id names files).
func validGID(s string) bool {
	if len(s) != 13 || s[0] != 'g' {
		return false
	}
	for _, c := range s[1:] {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// Restored is the target's Restored frame.
type Restored struct {
	Node      string  `json:"node"`
	PID       int     `json:"pid"`
	RestoreMS float64 `json:"restore_ms"` // holder start to program running
	PIDNS     bool    `json:"pidns"`      // restored in a fresh PID namespace
}

// Done is the target's Done frame: every page arrived.
type Done struct {
	PagesMS float64 `json:"pages_ms"` // restore to the last page
}

// Result is what a migration did, for 'onebox migrate'.
type Result struct {
	GID        string  `json:"gid"`
	From       string  `json:"from"`
	To         string  `json:"to"`
	PID        int     `json:"pid"`         // on the target
	PIDNS      bool    `json:"pidns"`       // the original PID was taken there
	FreezeMS   float64 `json:"freeze_ms"`   // dump start to images written
	ImagesMS   float64 `json:"images_ms"`   // image transfer
	RestoreMS  float64 `json:"restore_ms"`  // restore on the target
	DowntimeMS float64 `json:"downtime_ms"` // dump start to the program running on the target
	TotalMS    float64 `json:"total_ms"`    // request to the last page on the target
	// SourceDoneMS: request to the source's CRIU ending (every page sent).
	SourceDoneMS float64 `json:"source_done_ms"`
	// PagesMS: on the target, restore start to the lazy-pages daemon's end.
	PagesMS    float64 `json:"pages_ms"`
	ImageBytes int64   `json:"image_bytes"` // non-memory images sent
	PageBytes  int64   `json:"page_bytes"`  // page-server bytes sent
	Note       string  `json:"note"`
}

// SendFiles sends every regular file of dir (but CRIU logs and sockets)
// as File frames, then FilesDone. It returns the bytes sent.
func SendFiles(c *stream.Conn, dir string) (int64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name() < ents[j].Name() })
	var total int64
	buf := make([]byte, 0, stream.MaxPayload)
	data := make([]byte, 256<<10)
	for _, e := range ents {
		if !e.Type().IsRegular() || strings.HasSuffix(e.Name(), ".log") {
			continue
		}
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			return total, err
		}
		room := stream.MaxPayload - len(e.Name()) - 1
		sent := false
		for {
			n, rerr := f.Read(data[:min(room, len(data))])
			if n > 0 || (!sent && errors.Is(rerr, io.EOF)) {
				buf = stream.AppendFile(buf[:0], e.Name(), data[:n])
				if err := c.Write(stream.File, buf); err != nil {
					f.Close()
					return total, err
				}
				sent = true
				total += int64(n)
			}
			if rerr != nil {
				f.Close()
				if !errors.Is(rerr, io.EOF) {
					return total, rerr
				}
				break
			}
		}
	}
	return total, c.Write(stream.FilesDone, nil)
}

// MaxFiles bounds how many files a FileSink takes (a dump has a few per
// process and thread of the program).
const MaxFiles = 1 << 14

// FileSink writes received File frames into a directory. SendFiles sends
// each file's frames in a row, so one file is open at a time; a name that
// comes back after another file began is refused (O_EXCL).
type FileSink struct {
	Dir   string
	Max   int64 // bound on the total size
	total int64
	files int
	name  string
	cur   *os.File
}

// Write appends one File frame's data to its file.
func (s *FileSink) Write(payload []byte) error {
	name, data, err := stream.SplitFile(payload)
	if err != nil {
		return err
	}
	s.total += int64(len(data))
	if s.Max > 0 && s.total > s.Max {
		return fmt.Errorf("migrate: checkpoint images larger than %d bytes", s.Max)
	}
	if s.cur == nil || name != s.name {
		if err := s.Close(); err != nil {
			return err
		}
		if s.files++; s.files > MaxFiles {
			return fmt.Errorf("migrate: checkpoint of more than %d files", MaxFiles)
		}
		f, err := os.OpenFile(filepath.Join(s.Dir, name), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		s.cur, s.name = f, name
	}
	_, err = s.cur.Write(data)
	return err
}

// Close closes the open file, reporting its error (a full disk may only
// show on close). It does not sync: the images are read back at once, by
// this machine, and are worthless after a crash (the migration failed);
// an fsync per file cost the downtime 5 ms and more on ext4.
func (s *FileSink) Close() error {
	f := s.cur
	if f == nil {
		return nil
	}
	s.cur = nil
	return f.Close()
}

// Tunnel carries CRIU's page-server stream between the local CRIU's
// socket and Pages frames on a stream connection.
type Tunnel struct {
	Local *net.UnixConn // our end of CRIU's socketpair
	C     *stream.Conn

	mu   sync.Mutex
	sent int64 // guarded by mu
}

// Pump sends what the local CRIU writes as Pages frames, then PagesEOF.
// It returns when the local side ends or the connection fails.
func (t *Tunnel) Pump() error {
	// Data is read in place behind room for the header: no copy.
	buf := make([]byte, stream.HeaderSize+512<<10)
	for {
		n, err := t.Local.Read(buf[stream.HeaderSize:])
		if n > 0 {
			stream.PutHeader(buf, stream.Pages, n)
			if werr := t.C.WriteEncoded(buf[:stream.HeaderSize+n]); werr != nil {
				return werr
			}
			t.mu.Lock()
			t.sent += int64(n)
			t.mu.Unlock()
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return t.C.Write(stream.PagesEOF, nil)
			}
			return err
		}
	}
}

// Deliver hands a received Pages or PagesEOF frame to the local CRIU.
func (t *Tunnel) Deliver(f stream.Frame) error {
	if f.Type == stream.PagesEOF {
		return t.Local.CloseWrite()
	}
	_, err := t.Local.Write(f.Payload)
	return err
}

// Sent is the number of page-server bytes pumped so far.
func (t *Tunnel) Sent() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.sent
}

// SocketPair returns a connected pair of unix stream sockets: ours (a
// net.UnixConn) and CRIU's (an *os.File to pass as --ps-socket).
func SocketPair() (*net.UnixConn, *os.File, error) {
	fds, err := socketpair()
	if err != nil {
		return nil, nil, fmt.Errorf("migrate: socketpair: %w", err)
	}
	ours := os.NewFile(uintptr(fds[0]), "page-tunnel")
	theirs := os.NewFile(uintptr(fds[1]), "criu-page-socket")
	c, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		theirs.Close()
		return nil, nil, err
	}
	return c.(*net.UnixConn), theirs, nil
}

// PipeKey returns the inherit key of fd of process pid: "pipe:[ino]" for a
// pipe, the path without its leading slash for a file.
func PipeKey(pid, fd int) (string, error) {
	l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
	if err != nil {
		return "", err
	}
	if strings.HasPrefix(l, "pipe:[") {
		return l, nil
	}
	if strings.HasPrefix(l, "/") {
		return strings.TrimPrefix(l, "/"), nil
	}
	return "", fmt.Errorf("fd %d is %s, neither a pipe nor a file", fd, l)
}
