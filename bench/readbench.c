/* readbench: times reads of a file and hashes the bytes it read, so that
 * the benchmark can check them against the source image.
 *
 *   readbench seq  FILE BS                  read FILE from start to end, BS bytes per read
 *   readbench rand FILE BS COUNT SEED       COUNT preads of BS bytes at BS-aligned offsets
 *                                           drawn with a fixed-seed generator
 *   readbench rand2 A B BS COUNT SEED CHUNK the same offsets read from two files of
 *                                           one size, CHUNK reads from one, then the
 *                                           same CHUNK from the other (which goes first
 *                                           alternates): an A/B comparison on which a
 *                                           shared machine's swings fall alike
 *
 * Prints one line: bytes=N ops=N secs=F hash=HEX (rand2: one line per file,
 * A's first, each with its own reads' time and hash)
 * secs runs from just after open(2) (path lookup is not timed) to just
 * after the last read, hashing included.
 * The hash (below) depends on the bytes and their order; every hashed
 * piece is a whole BS-sized read (short reads are retried until BS bytes
 * or end of file), so the same file read the same way always gives the
 * same hash.
 *
 * Before timing it touches and frees as much memory as the read will fill
 * page cache with (up to 2 GiB). On a virtual machine whose balloon reports
 * free pages to the host (virtio-balloon free page reporting), memory freed
 * a while ago costs a host page fault per 4 KiB when touched again; the
 * first reader after a quiet spell paid that and the next did not, which
 * made the same read of the same image differ by 2x. Priming gives every
 * tool recently freed, still-backed pages. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* A Fletcher-style sum in 8 lanes over 32-bit words: a += w, b += a. b
 * weighs every word by its position, so moved, swapped, zeroed or changed
 * data changes the hash; the compiler vectorizes it (tens of GB/s), so
 * hashing costs little next to the reads it checks. */
#define LANES 8
static uint64_t sum_a[LANES], sum_b[LANES];

static void hash_piece(const unsigned char *p, size_t n) {
  uint64_t a[LANES], b[LANES];
  memcpy(a, sum_a, sizeof a);
  memcpy(b, sum_b, sizeof b);
  size_t i = 0;
  for (; i + 4 * LANES <= n; i += 4 * LANES) {
    uint32_t w[LANES];
    memcpy(w, p + i, sizeof w);
    for (int j = 0; j < LANES; j++) {
      a[j] += w[j];
      b[j] += a[j];
    }
  }
  for (; i < n; i++) {
    a[0] += p[i];
    b[0] += a[0];
  }
  b[1] += n; /* the piece length */
  memcpy(sum_a, a, sizeof a);
  memcpy(sum_b, b, sizeof b);
}

static uint64_t hash_final(void) {
  uint64_t h = 0x243f6a8885a308d3ULL;
  for (int j = 0; j < LANES; j++) {
    h = (h ^ sum_a[j]) * 0xff51afd7ed558ccdULL;
    h = (h ^ (h >> 33) ^ sum_b[j]) * 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 29;
  }
  return h;
}

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static void prime(const char *path) {
  struct stat st;
  if (stat(path, &st) != 0) return;
  size_t n = (size_t)st.st_size;
  if (n > ((size_t)2 << 30)) n = (size_t)2 << 30;
  n += 64 << 20;
  unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return;
  for (size_t i = 0; i < n; i += 4096) p[i] = 1;
  munmap(p, n);
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

/* Reads up to n bytes at off (or at the file position when off < 0);
 * returns the bytes read, fewer only at end of file. */
static size_t read_full(int fd, unsigned char *buf, size_t n, off_t off, const char *path) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = off < 0 ? read(fd, buf + got, n - got) : pread(fd, buf + got, n - got, off + got);
    if (r < 0) {
      if (errno == EINTR) continue;
      fprintf(stderr, "readbench: %s: read: %s\n", path, strerror(errno));
      exit(1);
    }
    if (r == 0) break;
    got += (size_t)r;
  }
  return got;
}

/* rand2: each file's reads are timed and hashed apart. */
static int rand2(const char *pa, const char *pb, size_t bs, uint64_t count, uint64_t seed, uint64_t chunk,
                 unsigned char *buf) {
  const char *paths[2] = {pa, pb};
  int fds[2];
  uint64_t ha[2][LANES] = {{0}}, hb[2][LANES] = {{0}}, bytes[2] = {0, 0};
  double secs[2] = {0, 0};
  prime(pa);
  for (int f = 0; f < 2; f++) {
    fds[f] = open(paths[f], O_RDONLY);
    if (fds[f] < 0) {
      fprintf(stderr, "readbench: %s: %s\n", paths[f], strerror(errno));
      return 1;
    }
  }
  struct stat st;
  if (fstat(fds[0], &st) || (uint64_t)st.st_size < bs) {
    fprintf(stderr, "readbench: %s: too small\n", pa);
    return 1;
  }
  uint64_t slots = (uint64_t)st.st_size / bs;
  off_t *offs = malloc(chunk * sizeof *offs);
  if (!offs || chunk == 0) return 2;
  for (uint64_t done = 0, c = 0; done < count; done += chunk, c++) {
    uint64_t n = count - done < chunk ? count - done : chunk;
    for (uint64_t i = 0; i < n; i++) offs[i] = (off_t)((splitmix(&seed) % slots) * bs);
    for (int k = 0; k < 2; k++) {
      int f = (int)((c + k) % 2);
      memcpy(sum_a, ha[f], sizeof sum_a);
      memcpy(sum_b, hb[f], sizeof sum_b);
      double t0 = now();
      for (uint64_t i = 0; i < n; i++) {
        if (read_full(fds[f], buf, bs, offs[i], paths[f]) != bs) {
          fprintf(stderr, "readbench: %s: short read at %lld\n", paths[f], (long long)offs[i]);
          return 1;
        }
        hash_piece(buf, bs);
      }
      secs[f] += now() - t0;
      bytes[f] += n * bs;
      memcpy(ha[f], sum_a, sizeof sum_a);
      memcpy(hb[f], sum_b, sizeof sum_b);
    }
  }
  for (int f = 0; f < 2; f++) {
    memcpy(sum_a, ha[f], sizeof sum_a);
    memcpy(sum_b, hb[f], sizeof sum_b);
    printf("bytes=%" PRIu64 " ops=%" PRIu64 " secs=%.6f hash=%016" PRIx64 "\n", bytes[f], bytes[f] / bs, secs[f],
           hash_final());
    close(fds[f]);
  }
  free(offs);
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 8 && !strcmp(argv[1], "rand2")) {
    size_t bs = strtoull(argv[4], NULL, 0);
    unsigned char *buf = NULL;
    if (bs == 0 || posix_memalign((void **)&buf, 4096, bs)) return 2;
    return rand2(argv[2], argv[3], bs, strtoull(argv[5], NULL, 0), strtoull(argv[6], NULL, 0),
                 strtoull(argv[7], NULL, 0), buf);
  }
  if (argc < 4 || (strcmp(argv[1], "seq") && strcmp(argv[1], "rand")) ||
      (!strcmp(argv[1], "rand") && argc < 6)) {
    fprintf(stderr, "usage: readbench seq FILE BS | readbench rand FILE BS COUNT SEED\n");
    return 2;
  }
  const char *path = argv[2];
  size_t bs = strtoull(argv[3], NULL, 0);
  unsigned char *buf = NULL;
  if (bs == 0 || posix_memalign((void **)&buf, 4096, bs)) {
    fprintf(stderr, "readbench: bad block size\n");
    return 2;
  }
  uint64_t bytes = 0, ops = 0;
  prime(path);
  int fd = open(path, O_RDONLY);
  if (fd < 0) {
    fprintf(stderr, "readbench: %s: %s\n", path, strerror(errno));
    return 1;
  }
  double t0 = now();
  if (!strcmp(argv[1], "seq")) {
    for (;;) {
      size_t n = read_full(fd, buf, bs, -1, path);
      if (n == 0) break;
      hash_piece(buf, n);
      bytes += n;
      ops++;
    }
  } else {
    uint64_t count = strtoull(argv[4], NULL, 0), seed = strtoull(argv[5], NULL, 0);
    struct stat st;
    if (fstat(fd, &st) || (uint64_t)st.st_size < bs) {
      fprintf(stderr, "readbench: %s: too small\n", path);
      return 1;
    }
    uint64_t slots = (uint64_t)st.st_size / bs;
    for (uint64_t i = 0; i < count; i++) {
      off_t off = (off_t)((splitmix(&seed) % slots) * bs);
      size_t n = read_full(fd, buf, bs, off, path);
      if (n != bs) {
        fprintf(stderr, "readbench: %s: short read at %lld\n", path, (long long)off);
        return 1;
      }
      hash_piece(buf, n);
      bytes += n;
      ops++;
    }
  }
  double secs = now() - t0;
  close(fd);
  printf("bytes=%" PRIu64 " ops=%" PRIu64 " secs=%.6f hash=%016" PRIx64 "\n", bytes, ops, secs,
         hash_final());
  return 0;
}
