// Package fusefs mounts the cluster filesystem namespace with FUSE
// (go-fuse): MOUNT/<node>/<export>/... is the exported tree of that node,
// reached over the fabric with the onebox-fs/1 protocol (cfs/client).
//
// Caching: entries and attributes are cached by the kernel for CacheTimeout
// (1 s), failed lookups not at all, and file data only while a file is open
// (the page cache is dropped at every open). So a change made on one node
// is seen by another within 1 s, and always by a program that opens the
// file after the change was closed (close-to-open consistency, like NFS).
// Concurrent writers on two nodes to one file are not coordinated: each
// write reaches the owning node whole, in the order it arrives.
//
// Symlinks are shown as symlinks, with their targets as stored on the
// node, and resolved by the kernel of the machine that follows them: a
// relative target stays within the mount (a link "up -> ../.." from an
// export's root leads to MOUNT, never to the node's directory above the
// export), an absolute one names a path on the local machine, as with
// NFS. A directory that would be its own ancestor (a bind mount on the
// node) answers ELOOP. A file whose name is gone (unlinked while open)
// is reached through its open handle only, never by a path.
//
// Failure: every request is bounded (client.DefaultTimeout); a node that
// is down or unreachable makes operations on its subtree fail with
// ENOTCONN (or EIO after a timeout), never hang, and its subtree works
// again as soon as the node answers. Files open across a broken
// connection fail with EIO until reopened.
package fusefs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/cfs/client"
	"github.com/onebox-project/onebox/cfs/proto"
)

// CacheTimeout is how long the kernel may cache entries and attributes.
const CacheTimeout = time.Second

// Options configure a mount.
type Options struct {
	Mountpoint string
	// Nodes lists the names of the nodes to show (every known member that
	// has not left, this one included).
	Nodes func() []string
	// Client returns the protocol client of a node, or nil if the node is
	// unknown.
	Client func(node string) *client.Client
	Logger *slog.Logger
	// Executable, if set, is the onebox binary, run as the unmount
	// watchdog (WatchdogCommand) so that a killed agent leaves no dead
	// mount behind.
	Executable string
}

// Mount is a mounted namespace.
type Mount struct {
	opts     Options
	server   *fuse.Server
	watchdog *watchdog

	closeOnce sync.Once
	closeErr  error
}

// New mounts the namespace at opts.Mountpoint (created if missing). A
// stale mount left there by a killed agent (ENOTCONN) is detached first.
func New(opts Options) (*Mount, error) {
	if err := PrepareMountpoint(opts.Mountpoint); err != nil {
		return nil, err
	}
	// The mount table names the real path; the watchdog looks it up there.
	opts.Mountpoint = realPath(opts.Mountpoint)
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	root := &rootNode{opts: &opts}
	ttl := CacheTimeout
	neg := time.Duration(0)
	fo := &fs.Options{
		EntryTimeout: &ttl, AttrTimeout: &ttl, NegativeTimeout: &neg,
		MountOptions: fuse.MountOptions{
			FsName: "onebox", Name: "onebox",
			DirectMount: true, DirectMountStrict: true,
			AllowOther:   true,
			MaxWrite:     proto.MaxIO,
			MaxReadAhead: proto.MaxIO,
			// Readdir returns names and types; attributes come with each
			// lookup, so plain readdir costs one round trip per batch.
			DisableReadDirPlus: true,
			DisableXAttrs:      true,
			Options:            []string{"default_permissions"},
		},
	}
	srv, err := fs.Mount(opts.Mountpoint, root, fo)
	if err != nil {
		return nil, fmt.Errorf("cfs: mount %s: %w", opts.Mountpoint, err)
	}
	m := &Mount{opts: opts, server: srv}
	if err := setReadahead(opts.Mountpoint, ReadaheadKiB); err != nil {
		opts.Logger.Debug("cfs: readahead not raised", "err", err)
	}
	if opts.Executable != "" {
		if m.watchdog, err = startWatchdog(opts.Executable, opts.Mountpoint); err != nil {
			opts.Logger.Warn("no unmount watchdog: a killed agent will leave a dead mount (the next start removes it)", "err", err)
		}
	}
	return m, nil
}

// Close unmounts; if the mount is busy it is detached lazily (it goes away
// when the last file in it is closed).
func (m *Mount) Close() error {
	if m == nil || m.server == nil {
		return nil
	}
	m.closeOnce.Do(func() { m.closeErr = m.unmount() })
	return m.closeErr
}

func (m *Mount) unmount() error {
	if m.watchdog != nil {
		defer m.watchdog.stop()
	}
	done := make(chan error, 1)
	go func() { done <- m.server.Unmount() }()
	select {
	case err := <-done:
		if err == nil {
			return nil
		}
	case <-time.After(2 * time.Second):
	}
	if err := unix.Unmount(m.opts.Mountpoint, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
		return fmt.Errorf("cfs: unmount %s: %w", m.opts.Mountpoint, err)
	}
	return nil
}

// ReadaheadKiB is the kernel's readahead window for the mount. FUSE's
// default (128 KiB) lets one request be in flight per sequential reader,
// so every read waits a full round trip to the owning node; 8 MiB keeps
// several 1 MiB reads in flight (about twice the throughput on loopback).
const ReadaheadKiB = 8192

// setReadahead sets the readahead of the mount's backing device info.
func setReadahead(mountpoint string, kib int) error {
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		return err
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	return os.WriteFile(p, []byte(strconv.Itoa(kib)), 0o644)
}

// PrepareMountpoint creates dir if needed and detaches a dead FUSE mount
// found there (a killed agent's: every access fails with ENOTCONN). A live
// onebox mount there is an error: another agent serves it.
func PrepareMountpoint(dir string) error {
	real := realPath(dir)
	for range 8 { // dead mounts may be stacked
		_, onebox := mountID(real)
		err := probe(dir)
		dead := errors.Is(err, syscall.ENOTCONN) || errors.Is(err, syscall.ECONNABORTED)
		if errors.Is(err, errNoAnswer) {
			return fmt.Errorf("cfs: %s %w", dir, err)
		}
		if !dead && onebox && err == nil {
			return fmt.Errorf("cfs: %s is already mounted by a running onebox agent: use another --mount", dir)
		}
		if !dead {
			break
		}
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
			return fmt.Errorf("cfs: detach stale mount %s: %w", dir, err)
		}
	}
	_, err := os.Stat(dir)
	if errors.Is(err, os.ErrNotExist) {
		err = os.MkdirAll(dir, 0o755)
	}
	if err != nil {
		return fmt.Errorf("cfs: mount point: %w", err)
	}
	return nil
}

// probeTimeout bounds probe: a onebox mount whose agent is alive but does
// not answer (stopped, stuck) must not hang the next agent's start.
var probeTimeout = 5 * time.Second

// errNoAnswer is probe's error for a mount that did not answer in time.
var errNoAnswer = errors.New("is mounted by a onebox agent that does not answer (stopped or stuck: end it, or give another --mount)")

// probe reads the directory: unlike stat, which the kernel may answer from
// its attribute cache, opening a FUSE directory always reaches its server.
// It gives up after probeTimeout (the read itself goes on in the
// background until the server answers or the mount goes).
func probe(dir string) error {
	done := make(chan error, 1)
	go func() { done <- probeNow(dir) }()
	select {
	case err := <-done:
		return err
	case <-time.After(probeTimeout):
		return errNoAnswer
	}
}

func probeNow(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.Readdirnames(1)
	if err == io.EOF {
		err = nil
	}
	return err
}

// realPath resolves symlinks in dir's parent (not in dir itself, which
// may be a dead mount), as the mount table names it.
func realPath(dir string) string {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return dir
	}
	parent, err := filepath.EvalSymlinks(filepath.Dir(abs))
	if err != nil {
		return abs
	}
	return filepath.Join(parent, filepath.Base(abs))
}

// rootNode lists the nodes.
type rootNode struct {
	fs.Inode
	opts *Options
}

var (
	_ fs.NodeReaddirer = (*rootNode)(nil)
	_ fs.NodeLookuper  = (*rootNode)(nil)
	_ fs.NodeGetattrer = (*rootNode)(nil)
	_ fs.NodeStatfser  = (*rootNode)(nil)
)

func (r *rootNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	dirAttr(&out.Attr)
	return 0
}

// started dates the synthetic directories (the root and the node
// directories).
var started = time.Now()

func dirAttr(a *fuse.Attr) {
	a.Mode = syscall.S_IFDIR | 0o755
	a.Nlink = 2
	t := started
	a.SetTimes(&t, &t, &t)
}

func (r *rootNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	out.NameLen = proto.MaxName
	out.Bsize = 4096
	return 0
}

func (r *rootNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	es := dots()
	for _, n := range r.opts.Nodes() {
		es = append(es, fuse.DirEntry{Name: n, Mode: syscall.S_IFDIR})
	}
	return fs.NewListDirStream(es), 0
}

func (r *rootNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	c := r.opts.Client(name)
	if c == nil {
		return nil, syscall.ENOENT
	}
	dirAttr(&out.Attr)
	return r.NewInode(ctx, &nodeDir{name: name, c: c}, fs.StableAttr{Mode: syscall.S_IFDIR}), 0
}

// nodeDir lists a node's exports.
type nodeDir struct {
	fs.Inode
	name string
	c    *client.Client
}

var (
	_ fs.NodeReaddirer = (*nodeDir)(nil)
	_ fs.NodeLookuper  = (*nodeDir)(nil)
	_ fs.NodeGetattrer = (*nodeDir)(nil)
)

func (d *nodeDir) exports(ctx context.Context) ([]proto.ExportInfo, syscall.Errno) {
	var l proto.ExportList
	if _, errno := d.c.Call(ctx, proto.OpExports, &proto.Empty{}, &l); errno != 0 {
		return nil, errno
	}
	return l.Exports, 0
}

func (d *nodeDir) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	dirAttr(&out.Attr)
	return 0
}

func (d *nodeDir) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	xs, errno := d.exports(ctx)
	if errno != 0 {
		return nil, errno
	}
	es := dots()
	for _, x := range xs {
		es = append(es, fuse.DirEntry{Name: x.Name, Mode: syscall.S_IFDIR})
	}
	return fs.NewListDirStream(es), 0
}

func (d *nodeDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	var a proto.Attr
	if _, errno := d.c.Call(ctx, proto.OpGetattr, &proto.PathReq{Export: name}, &a); errno != 0 {
		return nil, errno
	}
	fillAttr(&out.Attr, &a)
	return d.NewInode(ctx, &entry{c: d.c, node: d.name, export: name, dev: a.Dev, ino: a.Ino}, stable(d.name, name, &a)), 0
}

// entry is a file, directory or symlink inside an export. Its path is
// not stored: it is computed from the inode tree, which go-fuse keeps
// right across renames.
type entry struct {
	fs.Inode
	c      *client.Client
	node   string
	export string
	// dev and ino are the file's identity on its node. They go with
	// requests the kernel checked permissions for against the cached
	// attributes (open, setattr), so the node refuses (ESTALE) if the
	// path names another file by now, instead of acting on it as root.
	dev, ino uint64

	mu   sync.Mutex
	open map[*fileHandle]struct{} // guarded by mu: open files of the entry
	// fresh, for a directory, are its attributes as the node returned
	// them right after a change made in it through this mount, and
	// freshAt when. The kernel drops a directory's attributes after
	// every change in it and asks for them at the next path walk (for
	// its permission check): the first such getattr is answered from
	// here instead of another round trip. Guarded by mu.
	fresh   proto.Attr
	freshAt time.Time
}

// changed records the directory's attributes after a change made in it
// (nil or not this directory's: forget the last ones).
func (e *entry) changed(a *proto.Attr) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if a != nil && a.Ino == e.ino && a.Dev == e.dev && a.Ino != 0 {
		// Of two changes answered out of order, the later one's.
		if e.freshAt.IsZero() || !newer(e.fresh.Ctime, a.Ctime) {
			e.fresh, e.freshAt = *a, time.Now()
		}
	} else {
		e.freshAt = time.Time{}
	}
}

func newer(a, b proto.Timespec) bool {
	return a.Sec > b.Sec || a.Sec == b.Sec && a.Nsec > b.Nsec
}

// takeFresh returns the attributes recorded by changed, once, if they are
// younger than CacheTimeout: as fresh as what the kernel may cache.
func (e *entry) takeFresh() (proto.Attr, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ok := !e.freshAt.IsZero() && time.Since(e.freshAt) < CacheTimeout
	e.freshAt = time.Time{}
	return e.fresh, ok
}

// addOpen records an open file of the inode n (an entry).
func addOpen(n *fs.Inode, fh *fileHandle) {
	e, ok := n.Operations().(*entry)
	if !ok {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.open == nil {
		e.open = map[*fileHandle]struct{}{}
	}
	e.open[fh] = struct{}{}
	fh.node = e
}

// anyOpen is one of the entry's open files, or nil.
func (e *entry) anyOpen() *fileHandle {
	e.mu.Lock()
	defer e.mu.Unlock()
	for fh := range e.open {
		return fh
	}
	return nil
}

var (
	_ fs.NodeLookuper   = (*entry)(nil)
	_ fs.NodeGetattrer  = (*entry)(nil)
	_ fs.NodeSetattrer  = (*entry)(nil)
	_ fs.NodeReaddirer  = (*entry)(nil)
	_ fs.NodeOpener     = (*entry)(nil)
	_ fs.NodeCreater    = (*entry)(nil)
	_ fs.NodeMkdirer    = (*entry)(nil)
	_ fs.NodeUnlinker   = (*entry)(nil)
	_ fs.NodeRmdirer    = (*entry)(nil)
	_ fs.NodeRenamer    = (*entry)(nil)
	_ fs.NodeStatfser   = (*entry)(nil)
	_ fs.NodeFsyncer    = (*entry)(nil)
	_ fs.NodeReadlinker = (*entry)(nil)
	_ fs.NodeSymlinker  = (*entry)(nil)
	_ fs.NodeLinker     = (*entry)(nil)
)

// maxDepth bounds walks up the inode tree: a path of MaxPath bytes has at
// most this many components.
const maxDepth = proto.MaxPath/2 + 1

// path is the entry's path relative to its export. ok is false when the
// entry is no longer connected to its export's root (deleted, or its
// directory deleted, while still open or in use): the caller must then
// answer ESTALE (or use an open handle), never act on the root.
func (e *entry) path() (p string, ok bool) {
	var names []string
	n := e.EmbeddedInode()
	for range maxDepth {
		name, parent := n.Parent()
		if parent == nil {
			return "", false
		}
		if _, top := parent.Operations().(*nodeDir); top {
			if name != e.export {
				return "", false
			}
			slices.Reverse(names)
			return strings.Join(names, "/"), true
		}
		names = append(names, name)
		n = parent
	}
	return "", false
}

// childPath is the path of name in the entry, a directory.
func (e *entry) childPath(name string) (string, syscall.Errno) {
	dir, ok := e.path()
	if !ok {
		return "", syscall.ESTALE
	}
	return join(dir, name), 0
}

// isAncestor reports whether the inode number ino is the entry's or one
// of its ancestors' (or the tree is too deep to tell).
func (e *entry) isAncestor(ino uint64) bool {
	n := e.EmbeddedInode()
	for range maxDepth {
		if n.StableAttr().Ino == ino {
			return true
		}
		_, parent := n.Parent()
		if parent == nil {
			return false
		}
		n = parent
	}
	return true
}

func join(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

// newChild makes (or finds) the inode of a child of the entry. A child
// with the inode number of the entry or an ancestor (a bind mount of a
// directory inside itself on the node) would make the tree a loop, which
// go-fuse cannot walk: it is refused with ELOOP.
func (e *entry) newChild(ctx context.Context, a *proto.Attr, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	st := stable(e.node, e.export, a)
	if e.isAncestor(st.Ino) {
		return nil, syscall.ELOOP
	}
	fillAttr(&out.Attr, a)
	return e.NewInode(ctx, &entry{c: e.c, node: e.node, export: e.export, dev: a.Dev, ino: a.Ino}, st), 0
}

// stable identifies a file by where it lives: node, export, and its
// st_dev and st_ino there. A file keeps its inode number through the
// mount (programs such as cp -a and fts compare them across calls), and
// go-fuse reuses the Inode of a file looked up again, including under a
// new name after a rename elsewhere (the newest name is its path).
// Numbers are hashes below 2^63; go-fuse's automatic ones, used for the
// root and node directories, are above.
func stable(node, export string, a *proto.Attr) fs.StableAttr {
	return fs.StableAttr{Mode: a.Mode & syscall.S_IFMT, Ino: inoOf(node, export, a.Dev, a.Ino)}
}

func inoOf(node, export string, dev, ino uint64) uint64 {
	h := fnv.New64a()
	h.Write([]byte(node))
	h.Write([]byte{0})
	h.Write([]byte(export))
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:], dev)
	binary.LittleEndian.PutUint64(b[8:], ino)
	h.Write(b[:])
	v := h.Sum64() &^ (1 << 63)
	if v <= 1 { // 0: "pick one", 1: the root
		v += 2
	}
	return v
}

func (e *entry) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	p, errno := e.childPath(name)
	if errno != 0 {
		return nil, errno
	}
	var a proto.Attr
	if _, errno := e.c.Call(ctx, proto.OpGetattr, &proto.PathReq{Export: e.export, Path: p}, &a); errno != 0 {
		return nil, errno
	}
	return e.newChild(ctx, &a, out)
}

func (e *entry) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	var a proto.Attr
	var errno syscall.Errno
	if fh, ok := f.(*fileHandle); ok {
		errno = e.c.CallOn(ctx, fh.gen, proto.OpFstat, &proto.HandleReq{Handle: fh.h}, &a)
	} else if fresh, ok := e.takeFresh(); ok {
		a = fresh
	} else if p, ok := e.path(); ok {
		_, errno = e.c.Call(ctx, proto.OpGetattr, &proto.PathReq{Export: e.export, Path: p}, &a)
	} else {
		errno = syscall.ESTALE
	}
	if errno != 0 {
		return errno
	}
	fillAttr(&out.Attr, &a)
	return 0
}

func (e *entry) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	// An open handle is used as it is (the file may have been unlinked
	// or moved); otherwise the path, checked to still name this file.
	// The kernel passes the handle only for ftruncate: fchmod or
	// futimens of an open file whose name is gone use any open handle.
	r := proto.SetattrReq{Export: e.export, UID: ^uint32(0), GID: ^uint32(0), Caller: callerCred(ctx)}
	var gen uint64
	if fh, ok := f.(*fileHandle); ok {
		r.Handle, gen = fh.h, fh.gen
	} else if p, ok := e.path(); ok {
		r.Path, r.Dev, r.Ino = p, e.dev, e.ino
	} else if fh := e.anyOpen(); fh != nil {
		r.Handle, gen = fh.h, fh.gen
	} else {
		return syscall.ESTALE
	}
	if m, ok := in.GetMode(); ok {
		r.Valid |= proto.SetMode
		r.Mode = m & 0o7777
	}
	if u, ok := in.GetUID(); ok {
		r.Valid |= proto.SetOwner
		r.UID = u
	}
	if g, ok := in.GetGID(); ok {
		r.Valid |= proto.SetOwner
		r.GID = g
	}
	if s, ok := in.GetSize(); ok {
		r.Valid |= proto.SetSize
		r.Size = s
	}
	if in.Valid&fuse.FATTR_ATIME_NOW != 0 {
		r.Valid |= proto.SetAtimeNow
	} else if in.Valid&fuse.FATTR_ATIME != 0 {
		r.Valid |= proto.SetAtime
		r.Atime = proto.Timespec{Sec: int64(in.Atime), Nsec: in.Atimensec}
	}
	if in.Valid&fuse.FATTR_MTIME_NOW != 0 {
		r.Valid |= proto.SetMtimeNow
	} else if in.Valid&fuse.FATTR_MTIME != 0 {
		r.Valid |= proto.SetMtime
		r.Mtime = proto.Timespec{Sec: int64(in.Mtime), Nsec: in.Mtimensec}
	}
	e.changed(nil)
	var a proto.Attr
	var errno syscall.Errno
	if gen != 0 {
		errno = e.c.CallOn(ctx, gen, proto.OpSetattr, &r, &a)
	} else {
		_, errno = e.c.Call(ctx, proto.OpSetattr, &r, &a)
	}
	if errno != 0 {
		return errno
	}
	fillAttr(&out.Attr, &a)
	return 0
}

func (e *entry) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	p, ok := e.path()
	if !ok {
		return nil, syscall.ESTALE
	}
	var hr proto.HandleReply
	gen, errno := e.c.Call(ctx, proto.OpOpendir, &proto.PathReq{Export: e.export, Path: p}, &hr)
	if errno != 0 {
		return nil, errno
	}
	defer e.c.CallOn(context.Background(), gen, proto.OpClose, &proto.HandleReq{Handle: hr.Handle}, nil)
	es := dots()
	for {
		var l proto.DirList
		if errno := e.c.CallOn(ctx, gen, proto.OpReaddir, &proto.HandleReq{Handle: hr.Handle}, &l); errno != 0 {
			return nil, errno
		}
		if len(l.Entries) == 0 {
			break
		}
		for _, x := range l.Entries {
			es = append(es, fuse.DirEntry{Name: x.Name, Mode: x.Mode, Ino: inoOf(e.node, e.export, l.Dev, x.Ino)})
		}
	}
	return fs.NewListDirStream(es), 0
}

func (e *entry) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	p, ok := e.path()
	if !ok {
		return nil, 0, syscall.ESTALE
	}
	var hr proto.HandleReply
	gen, errno := e.c.Call(ctx, proto.OpOpen, &proto.OpenReq{Export: e.export, Path: p, Flags: flags, Dev: e.dev, Ino: e.ino, Caller: callerCred(ctx)}, &hr)
	if errno != 0 {
		return nil, 0, errno
	}
	fh := &fileHandle{c: e.c, gen: gen, h: hr.Handle}
	addOpen(e.EmbeddedInode(), fh)
	return fh, openFlags(flags), 0
}

// openFlags are the FUSE flags of a file opened with flags. Appends skip
// the page cache (direct I/O): through it, a write that crosses a page
// boundary goes to the node as two requests, and an append from another
// node can land between them. Direct, each write(2) of up to MaxIO bytes
// is one request, which the node appends whole (O_APPEND).
func openFlags(flags uint32) uint32 {
	if flags&syscall.O_APPEND != 0 {
		return fuse.FOPEN_DIRECT_IO
	}
	return 0
}

func (e *entry) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	p, errno := e.childPath(name)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	var hr proto.HandleReply
	r := proto.OpenReq{Export: e.export, Path: p, Flags: flags, Mode: mode, DirDev: e.dev, DirIno: e.ino, Caller: callerCred(ctx)}
	gen, errno := e.c.Call(ctx, proto.OpCreate, &r, &hr)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	e.changed(&hr.Dir)
	fh := &fileHandle{c: e.c, gen: gen, h: hr.Handle}
	n, errno := e.newChild(ctx, &hr.Attr, out)
	if errno != 0 {
		fh.Release(ctx)
		return nil, nil, 0, errno
	}
	addOpen(n, fh)
	return n, fh, openFlags(flags), 0
}

func (e *entry) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	p, errno := e.childPath(name)
	if errno != 0 {
		return nil, errno
	}
	var rep proto.EntryReply
	r := proto.OpenReq{Export: e.export, Path: p, Mode: mode, DirDev: e.dev, DirIno: e.ino, Caller: callerCred(ctx)}
	if _, errno := e.c.Call(ctx, proto.OpMkdir, &r, &rep); errno != 0 {
		return nil, errno
	}
	e.changed(&rep.Dir)
	return e.newChild(ctx, &rep.Attr, out)
}

// Symlink makes a symlink on the node. Its target is a string stored as
// it is: the kernel of whichever machine follows the link resolves it
// there, so an absolute target names a path on that machine (as with
// NFS), and a relative one stays within the mount.
func (e *entry) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	p, errno := e.childPath(name)
	if errno != 0 {
		return nil, errno
	}
	var a proto.Attr
	r := proto.SymlinkReq{Export: e.export, Path: p, Target: target, DirDev: e.dev, DirIno: e.ino, Caller: callerCred(ctx)}
	e.changed(nil)
	if _, errno := e.c.Call(ctx, proto.OpSymlink, &r, &a); errno != 0 {
		return nil, errno
	}
	return e.newChild(ctx, &a, out)
}

func (e *entry) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	p, ok := e.path()
	if !ok {
		return nil, syscall.ESTALE
	}
	var d proto.Data
	if _, errno := e.c.Call(ctx, proto.OpReadlink, &proto.PathReq{Export: e.export, Path: p}, &d); errno != 0 {
		return nil, errno
	}
	return d.Data, 0
}

// childID is the identity (on its node) of the child name as the kernel
// knows it: the file it checked permissions against before an unlink,
// rmdir, rename or link (for a sticky directory, the owner decides). Zero
// if the kernel had no inode for it.
func (e *entry) childID(name string) (dev, ino uint64) {
	if ch := e.GetChild(name); ch != nil {
		if ce, ok := ch.Operations().(*entry); ok {
			return ce.dev, ce.ino
		}
	}
	return 0, 0
}

func (e *entry) Unlink(ctx context.Context, name string) syscall.Errno {
	return e.remove(ctx, proto.OpUnlink, name)
}

func (e *entry) Rmdir(ctx context.Context, name string) syscall.Errno {
	return e.remove(ctx, proto.OpRmdir, name)
}

func (e *entry) remove(ctx context.Context, op proto.Op, name string) syscall.Errno {
	p, errno := e.childPath(name)
	if errno != 0 {
		return errno
	}
	r := proto.RemoveReq{Export: e.export, Path: p, Caller: callerCred(ctx)}
	r.Dev, r.Ino = e.childID(name)
	var dir proto.Attr
	_, errno = e.c.Call(ctx, op, &r, &dir)
	if errno == 0 {
		e.changed(&dir)
	}
	return errno
}

func (e *entry) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	np, ok := newParent.(*entry)
	if !ok || np.c != e.c || np.export != e.export {
		return syscall.EXDEV // across exports or nodes: mv copies instead
	}
	from, errno := e.childPath(name)
	if errno != 0 {
		return errno
	}
	to, errno := np.childPath(newName)
	if errno != 0 {
		return errno
	}
	r := proto.RenameReq{Export: e.export, From: from, To: to, Flags: flags, Caller: callerCred(ctx)}
	r.Dev, r.Ino = e.childID(name)
	r.ToDev, r.ToIno = np.childID(newName)
	e.changed(nil)
	np.changed(nil)
	_, errno = e.c.Call(ctx, proto.OpRename, &r, nil)
	return errno
}

// Link gives the file target (an entry of the same export) the new name
// name in this directory: a hard link on the node.
func (e *entry) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	te, ok := target.(*entry)
	if !ok || te.c != e.c || te.export != e.export {
		return nil, syscall.EXDEV
	}
	from, ok := te.path()
	if !ok {
		return nil, syscall.ESTALE
	}
	to, errno := e.childPath(name)
	if errno != 0 {
		return nil, errno
	}
	e.changed(nil)
	var a proto.Attr
	if _, errno := e.c.Call(ctx, proto.OpLink, &proto.LinkReq{Export: e.export, From: from, To: to, Dev: te.dev, Ino: te.ino, DirDev: e.dev, DirIno: e.ino, Caller: callerCred(ctx)}, &a); errno != 0 {
		return nil, errno
	}
	return e.newChild(ctx, &a, out)
}

func (e *entry) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	var s proto.Statfs
	if _, errno := e.c.Call(ctx, proto.OpStatfs, &proto.PathReq{Export: e.export}, &s); errno != 0 {
		return errno
	}
	out.Blocks, out.Bfree, out.Bavail, out.Files, out.Ffree = s.Blocks, s.Bfree, s.Bavail, s.Files, s.Ffree
	out.Bsize, out.NameLen, out.Frsize = s.Bsize, s.NameLen, s.Frsize
	return 0
}

func (e *entry) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	if fh, ok := f.(*fileHandle); ok {
		return fh.Fsync(ctx, flags)
	}
	return 0
}

// fileHandle is a file open on the owning node.
type fileHandle struct {
	c    *client.Client
	gen  uint64
	h    uint64
	node *entry // set once by addOpen, before the kernel sees the handle

	once sync.Once
}

var (
	_ fs.FileReader    = (*fileHandle)(nil)
	_ fs.FileWriter    = (*fileHandle)(nil)
	_ fs.FileFsyncer   = (*fileHandle)(nil)
	_ fs.FileReleaser  = (*fileHandle)(nil)
	_ fs.FileFlusher   = (*fileHandle)(nil)
	_ fs.FileAllocater = (*fileHandle)(nil)
)

// Allocate is fallocate(2) on the owning node (posix_fallocate, and
// punching holes).
func (f *fileHandle) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	return f.c.CallOn(ctx, f.gen, proto.OpFallocate, &proto.FallocateReq{Handle: f.h, Offset: off, Length: size, Mode: mode}, nil)
}

func (f *fileHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	var d proto.Data
	size := min(len(dest), proto.MaxIO)
	if errno := f.c.CallOn(ctx, f.gen, proto.OpRead, &proto.IOReq{Handle: f.h, Offset: uint64(off), Size: uint32(size)}, &d); errno != 0 {
		return nil, errno
	}
	if len(d.Data) > size {
		return nil, syscall.EIO // more than asked: not an answer to this read
	}
	return fuse.ReadResultData(d.Data), 0
}

func (f *fileHandle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	var written uint32
	for len(data) > 0 {
		n := min(len(data), proto.MaxIO)
		var c proto.Count
		if errno := f.c.CallOn(ctx, f.gen, proto.OpWrite, &proto.IOReq{Handle: f.h, Offset: uint64(off), Data: data[:n]}, &c); errno != 0 {
			if written > 0 {
				return written, 0
			}
			return 0, errno
		}
		if int(c.N) > n {
			return written, syscall.EIO // more than was sent: not an answer to this write
		}
		written += c.N
		if int(c.N) < n {
			break
		}
		data, off = data[n:], off+int64(n)
	}
	return written, 0
}

func (f *fileHandle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	var size uint32
	if flags&1 != 0 { // FUSE_FSYNC_FDATASYNC
		size = 1
	}
	return f.c.CallOn(ctx, f.gen, proto.OpFsync, &proto.IOReq{Handle: f.h, Size: size}, nil)
}

// Flush is called at every close(2) of a descriptor. Writes already went
// to the owning node, so there is nothing to push, and locks are the
// mounting kernel's: ENOSYS tells the kernel never to send FLUSH again,
// which saves a round trip to this process at every close. (The kernel
// still writes back a shared mapping's dirty pages at close first.)
func (f *fileHandle) Flush(ctx context.Context) syscall.Errno { return syscall.ENOSYS }

func (f *fileHandle) Release(ctx context.Context) syscall.Errno {
	f.once.Do(func() {
		if e := f.node; e != nil {
			e.mu.Lock()
			delete(e.open, f)
			e.mu.Unlock()
		}
		// Bounded by the client's timeout; a broken connection already
		// closed the handle on the owning node.
		if f.c.Gen() == f.gen {
			f.c.CallOn(context.Background(), f.gen, proto.OpClose, &proto.HandleReq{Handle: f.h}, nil)
		}
	})
	return 0
}

// dots are the "." and ".." entries every directory lists.
func dots() []fuse.DirEntry {
	return []fuse.DirEntry{{Name: ".", Mode: syscall.S_IFDIR}, {Name: "..", Mode: syscall.S_IFDIR}}
}

func fillAttr(out *fuse.Attr, a *proto.Attr) {
	out.Size = a.Size
	out.Blocks = a.Blocks
	out.Atime, out.Atimensec = uint64(a.Atime.Sec), a.Atime.Nsec
	out.Mtime, out.Mtimensec = uint64(a.Mtime.Sec), a.Mtime.Nsec
	out.Ctime, out.Ctimensec = uint64(a.Ctime.Sec), a.Ctime.Nsec
	out.Mode = a.Mode
	out.Nlink = a.Nlink
	out.Owner = fuse.Owner{Uid: a.UID, Gid: a.GID}
	out.Rdev = a.Rdev
	out.Blksize = a.Blksize
}
