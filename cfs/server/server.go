// Package server serves a node's exported directories to cluster members
// over the onebox-fs/1 protocol (cfs/proto). Every path is resolved with
// openat2(RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS) relative to an O_PATH
// descriptor of the export's root, so neither "..", nor a symlink, nor a
// rename race can reach a file outside the export; read-only exports
// refuse every change with EROFS.
//
// Symlinks are shown as symlinks: the last component of a path is never
// followed (O_NOFOLLOW, readlinkat), so getattr, readdir and readlink
// report the link itself and the client's kernel resolves it within the
// mount (an absolute target then names a path on the client's machine, as
// with NFS). Components before the last are resolved beneath the root, so
// a link leading outside is still refused. Only regular files and
// directories are opened: FIFOs, sockets and devices answer ENXIO, so no
// request can block on an open.
//
// A server running as root performs changes and opens with the caller's
// filesystem credentials (cred.go), after resolving the path as root, so
// its kernel checks the caller's permissions as a local one would; every
// request on an existing name also carries the identity of the file the
// client checked, and a name that now names another file is ESTALE.
package server

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/cfs/proto"
)

// Export is a directory to serve.
type Export struct {
	Name     string
	Path     string
	ReadOnly bool
	// RootSquash maps a caller's root user and group to nobody (65534),
	// as NFS's root_squash: root on another member gets no more than
	// any other user here.
	RootSquash bool
}

// Nobody is the user and group a squashed root becomes.
const Nobody = 65534

// squash applies the export's RootSquash to a request's caller, in place.
func (e *export) squash(c *proto.Cred) {
	if c == nil || !e.RootSquash {
		return
	}
	if c.UID == 0 {
		c.UID = Nobody
	}
	if c.GID == 0 {
		c.GID = Nobody
	}
	for i, g := range c.Groups {
		if g == 0 {
			c.Groups[i] = Nobody
		}
	}
}

// Limits per connection.
const (
	// MaxInflight bounds requests executed at once for one connection.
	MaxInflight = 64
	// MaxHandles bounds open files and directories per connection.
	MaxHandles = 4096
	// WriteTimeout bounds sending one reply, so a client that stops
	// reading cannot pin the server's goroutines.
	WriteTimeout = 10 * time.Second
	// CloseTimeout bounds how long Close waits for requests in flight.
	CloseTimeout = 5 * time.Second
)

type export struct {
	Export
	root int // O_PATH descriptor of the root directory
}

// Server serves exports.
type Server struct {
	// Observe, if set (before serving), is called after every request
	// with its op and the errno answered (metrics).
	Observe func(op proto.Op, errno unix.Errno)

	log     *slog.Logger
	exports map[string]*export
	names   []string

	mu     sync.Mutex
	conns  map[net.Conn]struct{} // guarded by mu
	closed bool                  // guarded by mu
	wg     sync.WaitGroup
}

// New opens the export roots. The roots are held open, so renaming an
// export's directory does not move what it serves.
func New(exports []Export, log *slog.Logger) (*Server, error) {
	s := &Server{log: log, exports: map[string]*export{}, conns: map[net.Conn]struct{}{}}
	for _, e := range exports {
		if !proto.ValidName(e.Name) {
			s.Close()
			return nil, fmt.Errorf("cfs: export name %q is not a valid name", e.Name)
		}
		fd, err := unix.Open(e.Path, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("cfs: export %s=%s: %w", e.Name, e.Path, err)
		}
		s.exports[e.Name] = &export{Export: e, root: fd}
		s.names = append(s.names, e.Name)
	}
	sort.Strings(s.names)
	return s, nil
}

// Close ends every connection and closes the export roots. It waits at
// most CloseTimeout for requests in flight; if some are still running
// then (a system call stuck on the exported filesystem), it returns
// anyway and leaves the roots open for them.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(CloseTimeout):
		s.log.Warn("cfs: requests still running after close; not waiting for them", "waited", CloseTimeout)
		return nil
	}
	for _, e := range s.exports {
		unix.Close(e.root)
	}
	s.exports = map[string]*export{}
	return nil
}

// handle is an open file or directory of one connection. Its descriptor
// is used under a read lock of rw and closed under the write lock, so a
// close never lets a request in flight use a reused descriptor number.
type handle struct {
	rw     sync.RWMutex
	closed bool       // guarded by rw
	dmu    sync.Mutex // serialises readdir on the descriptor
	fd     int
	exp    *export
	dir    bool
}

// close closes the descriptor once no request uses it.
func (h *handle) close() {
	h.rw.Lock()
	defer h.rw.Unlock()
	if !h.closed {
		h.closed = true
		unix.Close(h.fd)
	}
}

type conn struct {
	s   *Server
	c   net.Conn
	wmu sync.Mutex // one reply written at a time

	mu      sync.Mutex
	handles map[uint64]*handle // guarded by mu
	next    uint64             // guarded by mu
}

// ServeConn serves one member's connection until it closes; it owns c.
func (s *Server) ServeConn(c net.Conn) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	cn := &conn{s: s, c: c, handles: map[uint64]*handle{}}
	var reqs sync.WaitGroup
	defer func() {
		c.Close()
		reqs.Wait()
		cn.closeAll()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		s.wg.Done()
	}()
	br := bufio.NewReaderSize(c, 64<<10)
	sem := make(chan struct{}, MaxInflight)
	for {
		f, err := proto.ReadFrame(br)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) && !isEOF(err) {
				s.log.Debug("cfs: connection ended", "remote", c.RemoteAddr().String(), "err", err)
			}
			return
		}
		sem <- struct{}{}
		reqs.Add(1)
		go func() {
			defer func() { <-sem; reqs.Done() }()
			errno, reply := cn.dispatch(f.Op, f.Payload)
			if s.Observe != nil {
				s.Observe(f.Op, errno)
			}
			if d, ok := reply.(*dataReply); ok {
				cn.write(proto.FinishDataReply(d.frame, f.ID, f.Op, d.n))
				return
			}
			cn.write(proto.AppendReplyFrame(nil, f.ID, f.Op, uint32(errno), reply))
		}()
	}
}

func isEOF(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, unix.ECONNRESET)
}

// dataReply is a read's reply built in place: the file's bytes were read
// straight into the frame.
type dataReply struct {
	proto.Empty
	frame []byte
	n     int
}

func (cn *conn) write(frame []byte) {
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	_ = cn.c.SetWriteDeadline(time.Now().Add(WriteTimeout))
	if _, err := cn.c.Write(frame); err != nil {
		cn.c.Close() // the reader loop ends the connection
	}
}

func (cn *conn) closeAll() {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	for id, h := range cn.handles {
		h.close()
		delete(cn.handles, id)
	}
}

func (cn *conn) addHandle(h *handle) (uint64, unix.Errno) {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if len(cn.handles) >= MaxHandles {
		return 0, unix.EMFILE
	}
	cn.next++
	cn.handles[cn.next] = h
	return cn.next, 0
}

// acquire finds a handle and holds its descriptor open until release is
// called.
func (cn *conn) acquire(id uint64) (h *handle, release func(), errno unix.Errno) {
	cn.mu.Lock()
	h, ok := cn.handles[id]
	cn.mu.Unlock()
	if !ok {
		return nil, nil, unix.EBADF
	}
	h.rw.RLock()
	if h.closed {
		h.rw.RUnlock()
		return nil, nil, unix.EBADF
	}
	return h, h.rw.RUnlock, 0
}

func (cn *conn) removeHandle(id uint64) unix.Errno {
	cn.mu.Lock()
	h, ok := cn.handles[id]
	delete(cn.handles, id)
	cn.mu.Unlock()
	if !ok {
		return unix.EBADF
	}
	h.close() // waits for requests using it
	return 0
}

// errnoOf turns an error into the errno sent to the client.
func errnoOf(err error) unix.Errno {
	if err == nil {
		return 0
	}
	var e unix.Errno
	if errors.As(err, &e) {
		return e
	}
	return unix.EIO
}
