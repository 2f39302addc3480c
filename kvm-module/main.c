// SPDX-License-Identifier: GPL-2.0-only
/*
 * kvmx.ko: the /dev/kvmx character device, its ioctls and module
 * load/unload.  See include/kvmx/kvmx-fha.h for the ABI and
 * docs/kvm-module.md for building, signing and loading.
 */
#include <linux/device.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/slab.h>

#include "kvmx.h"

struct kvmx_counters kvmx_counters;

static int kvmx_open(struct inode *inode, struct file *file)
{
	struct kvmx_file *kf;

	kf = kzalloc(sizeof(*kf), GFP_KERNEL_ACCOUNT);
	if (!kf)
		return -ENOMEM;
	kf->file = file;
	mutex_init(&kf->lock);
	xa_init_flags(&kf->handles, XA_FLAGS_ALLOC1);
	INIT_LIST_HEAD(&kf->vms);
	file->private_data = kf;
	return 0;
}

/*
 * The last reference to the file is gone: close(), exit, or SIGKILL of
 * the owner (then the VM's memory may already be unmapped; the memslots
 * and their tracking still exist, they go with the VM).
 */
static int kvmx_release(struct inode *inode, struct file *file)
{
	struct kvmx_file *kf = file->private_data;

	kvmx_file_release_all(kf);
	xa_destroy(&kf->handles);
	mutex_destroy(&kf->lock);
	kfree(kf);
	return 0;
}

static long kvmx_ioctl_do(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct kvmx_file *kf = file->private_data;
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case KVMX_GET_API_VERSION:
		return KVMX_API_VERSION;
	case KVMX_FHA_ATTACH:
		return kvmx_attach(kf, uarg);
	case KVMX_FHA_DETACH:
		return kvmx_detach(kf, uarg);
	case KVMX_FHA_STATS:
		return kvmx_stats(kf, uarg);
	case KVMX_FHA_CLEAR_ERROR:
		return kvmx_clear_error(kf, uarg);
	case KVMX_GET_FEATURES:
		return KVMX_FEATURE_ERROR_NOTIFY | KVMX_FEATURE_FLUSH_OUTSIDE_SRCU |
		       KVMX_FEATURE_SIZED_STRUCTS | KVMX_FEATURE_DEEP_ONLY;
	default:
		return -ENOTTY;
	}
}

static long kvmx_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	long r = kvmx_ioctl_do(file, cmd, arg);

	if (r < 0)
		atomic64_inc(&kvmx_counters.rejected);
	return r;
}

static const struct file_operations kvmx_fops = {
	/* An open /dev/kvmx pins the module: rmmod is refused until close. */
	.owner = THIS_MODULE,
	.open = kvmx_open,
	.release = kvmx_release,
	.unlocked_ioctl = kvmx_ioctl,
	/* The structs have one layout for 32- and 64-bit callers. */
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

/*
 * Module-wide counters: /sys/class/misc/kvmx/{attachments,...}.  They add
 * up every user's VMs (one tenant could watch another's flush rate), so
 * only root reads them (0400); api_version stays world-readable.
 */
#define KVMX_COUNTER_ATTR(name, read)					\
static ssize_t name##_show(struct device *dev,				\
			   struct device_attribute *attr, char *buf)	\
{									\
	return sysfs_emit(buf, "%lld\n", (long long)read(&kvmx_counters.name)); \
}									\
static DEVICE_ATTR_ADMIN_RO(name)

KVMX_COUNTER_ATTR(attachments, atomic_read);
KVMX_COUNTER_ATTR(tracked, atomic_read);
KVMX_COUNTER_ATTR(vms, atomic_read);
KVMX_COUNTER_ATTR(guest_flushes, atomic64_read);
KVMX_COUNTER_ATTR(host_flushes, atomic64_read);
KVMX_COUNTER_ATTR(host_flush_errors, atomic64_read);
KVMX_COUNTER_ATTR(failed_flushes, atomic64_read);
KVMX_COUNTER_ATTR(inline_flushes, atomic64_read);
KVMX_COUNTER_ATTR(rejected, atomic64_read);

static ssize_t api_version_show(struct device *dev,
				struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%d\n", KVMX_API_VERSION);
}
static DEVICE_ATTR_RO(api_version);

static struct attribute *kvmx_attrs[] = {
	&dev_attr_api_version.attr,
	&dev_attr_attachments.attr,
	&dev_attr_tracked.attr,
	&dev_attr_vms.attr,
	&dev_attr_guest_flushes.attr,
	&dev_attr_host_flushes.attr,
	&dev_attr_host_flush_errors.attr,
	&dev_attr_failed_flushes.attr,
	&dev_attr_inline_flushes.attr,
	&dev_attr_rejected.attr,
	NULL,
};
ATTRIBUTE_GROUPS(kvmx);

static struct miscdevice kvmx_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = KVMX_DEVICE_NAME,
	.fops = &kvmx_fops,
	.groups = kvmx_groups,
	.mode = 0600,
};

static int __init kvmx_init(void)
{
	int r;

	r = misc_register(&kvmx_dev);
	if (r) {
		pr_err("kvmx: cannot register /dev/%s: %d\n", KVMX_DEVICE_NAME, r);
		return r;
	}
	pr_info("kvmx: /dev/%s ready, API version %d (flush hint pages in KVM)\n",
		KVMX_DEVICE_NAME, KVMX_API_VERSION);
	return 0;
}

static void __exit kvmx_exit(void)
{
	/*
	 * No file is open (each pins the module), so nothing is attached and
	 * no notifier of ours is registered.
	 */
	misc_deregister(&kvmx_dev);
	pr_info("kvmx: unloaded\n");
}

module_init(kvmx_init);
module_exit(kvmx_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("kvmx project");
MODULE_DESCRIPTION("kvmx: NVDIMM flush hint pages handled inside KVM (page-track write notifier)");
MODULE_SOFTDEP("pre: kvm");
