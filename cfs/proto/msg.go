package proto

// Empty is a message without fields.
type Empty struct{}

func (*Empty) encode(*enc) {}
func (*Empty) decode(*dec) {}

// ExportInfo names an export.
type ExportInfo struct {
	Name     string
	ReadOnly bool
}

// ExportList answers OpExports.
type ExportList struct{ Exports []ExportInfo }

func (m *ExportList) encode(e *enc) {
	e.u32(uint32(len(m.Exports)))
	for _, x := range m.Exports {
		e.str(x.Name)
		e.u8(b2u(x.ReadOnly))
	}
}

func (m *ExportList) decode(d *dec) {
	n := d.count(5)
	m.Exports = make([]ExportInfo, 0, n)
	for i := 0; i < n && d.err == nil; i++ {
		name := d.str(MaxName)
		ro := d.bool()
		m.Exports = append(m.Exports, ExportInfo{Name: name, ReadOnly: ro})
	}
}

// PathReq names a path in an export.
type PathReq struct {
	Export string
	Path   string
}

func (m *PathReq) encode(e *enc) { e.str(m.Export); e.str(m.Path) }
func (m *PathReq) decode(d *dec) { m.Export = d.str(MaxName); m.Path = d.str(MaxPath) }

// MaxGroups bounds the supplementary groups a request carries.
const MaxGroups = 256

// Cred is the user a request is made for: the calling process on the
// client, with its supplementary groups. The server acts with these
// filesystem credentials, so its own kernel checks permissions too, and
// what is created is the caller's.
type Cred struct {
	UID, GID uint32
	Groups   []uint32
}

func (c *Cred) encode(e *enc) {
	e.u32(c.UID)
	e.u32(c.GID)
	e.u32(uint32(len(c.Groups)))
	for _, g := range c.Groups {
		e.u32(g)
	}
}

func (c *Cred) decode(d *dec) {
	c.UID = d.u32()
	c.GID = d.u32()
	n := d.count(4)
	if d.err == nil && n > MaxGroups {
		d.fail("too many groups")
		return
	}
	c.Groups = nil
	if n > 0 {
		c.Groups = make([]uint32, n)
	}
	for i := range c.Groups {
		c.Groups[i] = d.u32()
	}
}

// OpenReq opens, creates or makes a directory at a path.
type OpenReq struct {
	Export string
	Path   string
	Flags  uint32 // open(2) flags
	Mode   uint32 // permission bits for create and mkdir
	Caller Cred
	// Dev and Ino, if Ino is non-zero, are the identity of the file the
	// client checked permissions against (its cached attributes): the
	// server answers ESTALE if the path now names another file, so a
	// file swapped in between (a symlink to a root-only file) is never
	// opened on the caller's behalf.
	Dev, Ino uint64
	// DirDev and DirIno, for create and mkdir, are the identity of the
	// parent directory the client checked (write permission): another
	// directory at that path by now gets ESTALE.
	DirDev, DirIno uint64
}

func (m *OpenReq) encode(e *enc) {
	e.str(m.Export)
	e.str(m.Path)
	e.u32(m.Flags)
	e.u32(m.Mode)
	m.Caller.encode(e)
	e.u64(m.Dev)
	e.u64(m.Ino)
	e.u64(m.DirDev)
	e.u64(m.DirIno)
}

func (m *OpenReq) decode(d *dec) {
	m.Export = d.str(MaxName)
	m.Path = d.str(MaxPath)
	m.Flags = d.u32()
	m.Mode = d.u32()
	m.Caller.decode(d)
	m.Dev = d.u64()
	m.Ino = d.u64()
	m.DirDev = d.u64()
	m.DirIno = d.u64()
}

// SymlinkReq makes a symlink at Path whose target is Target, a string
// stored as it is (the client's kernel resolves it, in the client's
// namespace).
type SymlinkReq struct {
	Export string
	Path   string
	Target string
	Caller Cred
	// DirDev, DirIno: the parent directory the client checked (OpenReq).
	DirDev, DirIno uint64
}

func (m *SymlinkReq) encode(e *enc) {
	e.str(m.Export)
	e.str(m.Path)
	e.str(m.Target)
	m.Caller.encode(e)
	e.u64(m.DirDev)
	e.u64(m.DirIno)
}

func (m *SymlinkReq) decode(d *dec) {
	m.Export = d.str(MaxName)
	m.Path = d.str(MaxPath)
	m.Target = d.str(MaxPath)
	m.Caller.decode(d)
	m.DirDev = d.u64()
	m.DirIno = d.u64()
	if d.err == nil && m.Target == "" {
		d.fail("empty symlink target")
	}
}

// HandleReq names an open handle.
type HandleReq struct{ Handle uint64 }

func (m *HandleReq) encode(e *enc) { e.u64(m.Handle) }
func (m *HandleReq) decode(d *dec) { m.Handle = d.u64() }

// HandleReply answers an open: the handle and, for create, the new file's
// attributes and its directory's after the create.
type HandleReply struct {
	Handle uint64
	Attr   Attr
	Dir    Attr
}

func (m *HandleReply) encode(e *enc) { e.u64(m.Handle); m.Attr.encode(e); m.Dir.encode(e) }
func (m *HandleReply) decode(d *dec) { m.Handle = d.u64(); m.Attr.decode(d); m.Dir.decode(d) }

// EntryReply answers mkdir: the new entry's attributes and its
// directory's after the change (the client's kernel asks for those next,
// for the permission check of its next path walk).
type EntryReply struct {
	Attr Attr
	Dir  Attr
}

func (m *EntryReply) encode(e *enc) { m.Attr.encode(e); m.Dir.encode(e) }
func (m *EntryReply) decode(d *dec) { m.Attr.decode(d); m.Dir.decode(d) }

// IOReq reads (Size bytes) or writes (Data) at Offset of a handle.
type IOReq struct {
	Handle uint64
	Offset uint64
	Size   uint32
	Data   []byte
}

func (m *IOReq) encode(e *enc) { e.u64(m.Handle); e.u64(m.Offset); e.u32(m.Size); e.bytes(m.Data) }
func (m *IOReq) decode(d *dec) {
	m.Handle = d.u64()
	m.Offset = d.u64()
	m.Size = d.u32()
	m.Data = d.bytes(MaxIO)
	if d.err == nil && (m.Size > MaxIO || m.Offset > 1<<63-1) {
		d.fail("io request out of range")
	}
}

// Data answers a read.
type Data struct{ Data []byte }

func (m *Data) encode(e *enc) { e.bytes(m.Data) }
func (m *Data) decode(d *dec) { m.Data = d.bytes(MaxIO) }

// Count answers a write.
type Count struct{ N uint32 }

func (m *Count) encode(e *enc) { e.u32(m.N) }
func (m *Count) decode(d *dec) { m.N = d.u32() }

// Timespec is a time as seconds and nanoseconds.
type Timespec struct {
	Sec  int64
	Nsec uint32
}

func (t *Timespec) encode(e *enc) { e.u64(uint64(t.Sec)); e.u32(t.Nsec) }
func (t *Timespec) decode(d *dec) {
	t.Sec = int64(d.u64())
	t.Nsec = d.u32()
	if d.err == nil && t.Nsec >= 1e9 {
		d.fail("nanoseconds out of range")
	}
}

// Attr is a file's attributes, as stat(2) reports them.
type Attr struct {
	Dev, Ino            uint64 // identity on the node: st_dev, st_ino
	Size, Blocks        uint64
	Atime, Mtime, Ctime Timespec
	Mode, Nlink         uint32
	UID, GID, Rdev      uint32
	Blksize             uint32
}

func (a *Attr) encode(e *enc) {
	e.u64(a.Dev)
	e.u64(a.Ino)
	e.u64(a.Size)
	e.u64(a.Blocks)
	a.Atime.encode(e)
	a.Mtime.encode(e)
	a.Ctime.encode(e)
	for _, v := range []uint32{a.Mode, a.Nlink, a.UID, a.GID, a.Rdev, a.Blksize} {
		e.u32(v)
	}
}

func (a *Attr) decode(d *dec) {
	a.Dev = d.u64()
	a.Ino = d.u64()
	a.Size = d.u64()
	a.Blocks = d.u64()
	a.Atime.decode(d)
	a.Mtime.decode(d)
	a.Ctime.decode(d)
	for _, p := range []*uint32{&a.Mode, &a.Nlink, &a.UID, &a.GID, &a.Rdev, &a.Blksize} {
		*p = d.u32()
	}
}

// DirEntry is one directory entry.
type DirEntry struct {
	Name string
	Mode uint32 // the type bits (S_IFMT) only
	Ino  uint64
}

// DirList answers a readdir: the next batch of entries, empty at the end,
// and the directory's st_dev (the entries' inode numbers are on it).
type DirList struct {
	Dev     uint64
	Entries []DirEntry
}

func (m *DirList) encode(e *enc) {
	e.u64(m.Dev)
	e.u32(uint32(len(m.Entries)))
	for _, x := range m.Entries {
		e.str(x.Name)
		e.u32(x.Mode)
		e.u64(x.Ino)
	}
}

func (m *DirList) decode(d *dec) {
	m.Dev = d.u64()
	n := d.count(16)
	m.Entries = make([]DirEntry, 0, n)
	for i := 0; i < n && d.err == nil; i++ {
		var x DirEntry
		x.Name = d.str(MaxName)
		x.Mode = d.u32()
		x.Ino = d.u64()
		if d.err == nil && !ValidName(x.Name) {
			d.fail("bad entry name")
		}
		m.Entries = append(m.Entries, x)
	}
}

// Setattr fields (SetattrReq.Valid).
const (
	SetMode uint32 = 1 << iota
	SetOwner
	SetSize
	SetAtime
	SetAtimeNow
	SetMtime
	SetMtimeNow
	setAll = SetMtimeNow<<1 - 1
)

// SetattrReq changes attributes of a path, or of an open handle (Handle
// non-zero, Path then empty): a handle is valid only with the export it
// was opened in, and the path is not consulted.
type SetattrReq struct {
	Export       string
	Path         string
	Handle       uint64
	Valid        uint32
	Mode         uint32
	UID, GID     uint32
	Size         uint64
	Atime, Mtime Timespec
	// Dev and Ino, if Ino is non-zero, are the identity the client
	// checked (see OpenReq); a path naming another file gets ESTALE.
	Dev, Ino uint64
	Caller   Cred // who asks (UID and GID above are chown's new owner)
}

func (m *SetattrReq) encode(e *enc) {
	e.str(m.Export)
	e.str(m.Path)
	e.u64(m.Handle)
	e.u32(m.Valid)
	e.u32(m.Mode)
	e.u32(m.UID)
	e.u32(m.GID)
	e.u64(m.Size)
	m.Atime.encode(e)
	m.Mtime.encode(e)
	e.u64(m.Dev)
	e.u64(m.Ino)
	m.Caller.encode(e)
}

func (m *SetattrReq) decode(d *dec) {
	m.Export = d.str(MaxName)
	m.Path = d.str(MaxPath)
	m.Handle = d.u64()
	m.Valid = d.u32()
	m.Mode = d.u32()
	m.UID = d.u32()
	m.GID = d.u32()
	m.Size = d.u64()
	m.Atime.decode(d)
	m.Mtime.decode(d)
	m.Dev = d.u64()
	m.Ino = d.u64()
	m.Caller.decode(d)
	if d.err == nil && (m.Valid&^setAll != 0 || m.Size > 1<<63-1) {
		d.fail("setattr out of range")
	}
}

// RemoveReq unlinks a file or removes a directory. Dev and Ino, if Ino is
// non-zero, are the identity of what the client checked (for a sticky
// directory, its owner): another file at Path by now gets ESTALE.
type RemoveReq struct {
	Export   string
	Path     string
	Dev, Ino uint64
	Caller   Cred
}

func (m *RemoveReq) encode(e *enc) {
	e.str(m.Export)
	e.str(m.Path)
	e.u64(m.Dev)
	e.u64(m.Ino)
	m.Caller.encode(e)
}

func (m *RemoveReq) decode(d *dec) {
	m.Export = d.str(MaxName)
	m.Path = d.str(MaxPath)
	m.Dev = d.u64()
	m.Ino = d.u64()
	m.Caller.decode(d)
}

// RenameReq renames within one export. Dev and Ino identify the file the
// client checked at From, ToDev and ToIno the one it knew at To (the one
// replaced); zero Ino: not checked. Another file there gets ESTALE.
type RenameReq struct {
	Export       string
	From, To     string
	Flags        uint32 // renameat2(2) flags
	Dev, Ino     uint64
	ToDev, ToIno uint64
	Caller       Cred
}

func (m *RenameReq) encode(e *enc) {
	e.str(m.Export)
	e.str(m.From)
	e.str(m.To)
	e.u32(m.Flags)
	e.u64(m.Dev)
	e.u64(m.Ino)
	e.u64(m.ToDev)
	e.u64(m.ToIno)
	m.Caller.encode(e)
}

func (m *RenameReq) decode(d *dec) {
	m.Export = d.str(MaxName)
	m.From = d.str(MaxPath)
	m.To = d.str(MaxPath)
	m.Flags = d.u32()
	m.Dev = d.u64()
	m.Ino = d.u64()
	m.ToDev = d.u64()
	m.ToIno = d.u64()
	m.Caller.decode(d)
}

// LinkReq makes To a new name (a hard link) of the file at From, which
// must be the file Dev, Ino if Ino is non-zero; To's directory must be
// DirDev, DirIno (OpenReq) if DirIno is non-zero.
type LinkReq struct {
	Export         string
	From, To       string
	Dev, Ino       uint64
	DirDev, DirIno uint64
	Caller         Cred
}

func (m *LinkReq) encode(e *enc) {
	e.str(m.Export)
	e.str(m.From)
	e.str(m.To)
	e.u64(m.Dev)
	e.u64(m.Ino)
	e.u64(m.DirDev)
	e.u64(m.DirIno)
	m.Caller.encode(e)
}

func (m *LinkReq) decode(d *dec) {
	m.Export = d.str(MaxName)
	m.From = d.str(MaxPath)
	m.To = d.str(MaxPath)
	m.Dev = d.u64()
	m.Ino = d.u64()
	m.DirDev = d.u64()
	m.DirIno = d.u64()
	m.Caller.decode(d)
}

// FallocateReq is fallocate(2) on an open handle.
type FallocateReq struct {
	Handle         uint64
	Offset, Length uint64
	Mode           uint32
}

func (m *FallocateReq) encode(e *enc) {
	e.u64(m.Handle)
	e.u64(m.Offset)
	e.u64(m.Length)
	e.u32(m.Mode)
}
func (m *FallocateReq) decode(d *dec) {
	m.Handle = d.u64()
	m.Offset = d.u64()
	m.Length = d.u64()
	m.Mode = d.u32()
	if d.err == nil && (m.Offset > 1<<63-1 || m.Length > 1<<63-1) {
		d.fail("fallocate out of range")
	}
}

// Statfs answers OpStatfs.
type Statfs struct {
	Blocks, Bfree, Bavail, Files, Ffree uint64
	Bsize, NameLen, Frsize              uint32
}

func (m *Statfs) encode(e *enc) {
	for _, v := range []uint64{m.Blocks, m.Bfree, m.Bavail, m.Files, m.Ffree} {
		e.u64(v)
	}
	e.u32(m.Bsize)
	e.u32(m.NameLen)
	e.u32(m.Frsize)
}

func (m *Statfs) decode(d *dec) {
	for _, p := range []*uint64{&m.Blocks, &m.Bfree, &m.Bavail, &m.Files, &m.Ffree} {
		*p = d.u64()
	}
	m.Bsize = d.u32()
	m.NameLen = d.u32()
	m.Frsize = d.u32()
}

// ValidName reports whether s can be one path component: non-empty, at
// most MaxName bytes, not "." or "..", without '/' or NUL.
func ValidName(s string) bool {
	if s == "" || s == "." || s == ".." || len(s) > MaxName {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] == '/' || s[i] == 0 {
			return false
		}
	}
	return true
}

// ValidPath reports whether p is a relative path of valid names joined by
// single slashes ("" is the export root). It never contains "..", so the
// only way out of an export would be a symlink, which the server's
// RESOLVE_BENEATH refuses.
func ValidPath(p string) bool {
	if p == "" {
		return true
	}
	if len(p) > MaxPath {
		return false
	}
	start := 0
	for i := 0; i <= len(p); i++ {
		if i == len(p) || p[i] == '/' {
			if !ValidName(p[start:i]) {
				return false
			}
			start = i + 1
		}
	}
	return true
}

func b2u(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}
